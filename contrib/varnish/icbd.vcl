# UNTESTED: an example, not run by icbd's tests (contrib/nginx/ is); it compiles
# (varnishd -C, Varnish 7.1).
#
# Varnish (Debian 12: varnish 7.1) in front of an icbd replica (or the
# master: then set the backend to it, and streams are cached too). Give its
# URL to cache servers as --upstream, or to the replica as --advertise (to
# replicas as --master, in front of the master).
#
# Credentials: this Varnish trusts the network; admit only the site's
# networks (the acl below). Varnish's built-in logic passes every request
# with an Authorization header; objects are public and the same for every
# caller, so they are looked up whatever the token (docs/SECURITY.md).

vcl 4.1;

backend icbd {
    .host = "192.0.2.10";   # the replica's address (Varnish resolves it when it loads the VCL)
    .port = "7401";
    .first_byte_timeout = 300s;   # the master may be making a stream again
    .between_bytes_timeout = 60s;
}

acl site_networks {
    "10.0.0.0"/8;
    "172.16.0.0"/12;
    "192.168.0.0"/16;
}

sub vcl_recv {
    if (client.ip !~ site_networks) {
        return (synth(403, "Forbidden"));
    }
    if (req.method == "GET" || req.method == "HEAD") {
        if (req.url ~ "^/v1/(blocks|manifests|profiles|streams)/[0-9a-f]{64}(\?|$)") {
            # A block's ?imi=&version= hints do not change its bytes.
            set req.url = regsub(req.url, "\?.*$", "");
            return (hash);
        }
    }
    return (pass);  # control calls: never cached (and they say no-store)
}

sub vcl_hash {
    hash_data(req.url);  # the object's path alone: not the host, not the token
    return (lookup);
}

sub vcl_backend_response {
    if (bereq.url ~ "^/v1/(blocks|manifests|profiles|streams)/") {
        set beresp.do_stream = true;   # a stream is sent on while it is fetched
        if (beresp.status != 200) {
            set beresp.uncacheable = true;
            set beresp.ttl = 0s;
        }
    }
    return (deliver);
}
