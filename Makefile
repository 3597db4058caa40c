# icbd: `make demo` and `make test` install what is missing themselves.
VENV   := .venv
PYTHON ?= $(shell command -v python3.11 || command -v python3)
STAMP  := $(VENV)/.installed

# `make install`: the package and its dependencies in a virtual environment
# under LIBDIR, `icbd` in BINDIR, mount(8)'s helper in SBINDIR, the systemd
# units, a commented sample config, the man page and bash completion.
# DESTDIR stages it all for a package; PIP_ARGS goes to pip (e.g. an index).
PREFIX        ?= /usr/local
DESTDIR       ?=
BINDIR        ?= $(PREFIX)/bin
LIBDIR        ?= $(PREFIX)/lib/icbd
SBINDIR       ?= /sbin
SYSCONFDIR    ?= /etc
UNITDIR       ?= $(PREFIX)/lib/systemd/system
MANDIR        ?= $(PREFIX)/share/man
COMPLETIONDIR ?= $(PREFIX)/share/bash-completion/completions
DOCDIR        ?= $(PREFIX)/share/doc/icbd
PIP_ARGS      ?=
UNITS         := icbd-master.service icbd-replica@.service icbd-cache@.service icbd-mount@.service
EXAMPLES      := imis.mount imis.automount

.PHONY: setup test test-quick demo bench lint clean install uninstall man

setup: $(STAMP)

$(STAMP): pyproject.toml scripts/install-packages
	scripts/install-packages
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[test,bench]'
	touch $(STAMP)

test: setup
	$(VENV)/bin/pytest -q tests

test-quick: setup
	$(VENV)/bin/pytest -q -m "not slow" tests

demo: setup
	$(VENV)/bin/python -m bench.demo

bench: setup
	$(VENV)/bin/icbd bench

lint: setup
	$(VENV)/bin/ruff check .

# The man page, made from --help by help2man (build/icbd.1).
man: setup
	mkdir -p build
	ICBD_CONFIG=/dev/null help2man --no-info --section=1 --include=contrib/icbd.h2m \
		--output=build/icbd.1 $(VENV)/bin/icbd

install:
	$(PYTHON) -m venv $(DESTDIR)$(LIBDIR)
	$(DESTDIR)$(LIBDIR)/bin/pip install -q $(PIP_ARGS) --upgrade .
	install -d $(DESTDIR)$(BINDIR) $(DESTDIR)$(SBINDIR) $(DESTDIR)$(UNITDIR) $(DESTDIR)$(MANDIR)/man1 \
		$(DESTDIR)$(COMPLETIONDIR) $(DESTDIR)$(SYSCONFDIR)/icbd $(DESTDIR)$(DOCDIR)/examples
	# what needs the environment to run, made before its scripts move to LIBDIR
	ICBD_CONFIG=/dev/null help2man --no-info --section=1 --include=contrib/icbd.h2m \
		--output=$(DESTDIR)$(MANDIR)/man1/icbd.1 $(DESTDIR)$(LIBDIR)/bin/icbd
	ICBD_CONFIG=/dev/null $(DESTDIR)$(LIBDIR)/bin/python -m icbd.cli completion bash \
		> $(DESTDIR)$(COMPLETIONDIR)/icbd
	ICBD_CONFIG=/dev/null $(DESTDIR)$(LIBDIR)/bin/python -m icbd.cli config sample \
		> $(DESTDIR)$(SYSCONFDIR)/icbd/icbd.toml.sample
	test -e $(DESTDIR)$(SYSCONFDIR)/icbd/icbd.toml || \
		install -m 0644 $(DESTDIR)$(SYSCONFDIR)/icbd/icbd.toml.sample $(DESTDIR)$(SYSCONFDIR)/icbd/icbd.toml
	# staged (DESTDIR): the environment's scripts name the interpreter where it will be
	if [ -n "$(DESTDIR)" ]; then \
		grep -rlI --null "$(DESTDIR)$(LIBDIR)" $(DESTDIR)$(LIBDIR)/bin $(DESTDIR)$(LIBDIR)/pyvenv.cfg | \
			xargs -0 -r sed -i "s|$(DESTDIR)$(LIBDIR)|$(LIBDIR)|g"; \
	fi
	ln -sfn $(LIBDIR)/bin/icbd $(DESTDIR)$(BINDIR)/icbd
	ln -sfn $(LIBDIR)/bin/mount.fuse.icbd $(DESTDIR)$(SBINDIR)/mount.fuse.icbd
	for unit in $(UNITS); do \
		sed -e 's|@BINDIR@|$(BINDIR)|g' -e 's|@SYSCONFDIR@|$(SYSCONFDIR)|g' contrib/systemd/$$unit \
			> $(DESTDIR)$(UNITDIR)/$$unit && chmod 0644 $(DESTDIR)$(UNITDIR)/$$unit; \
	done
	for example in $(EXAMPLES); do install -m 0644 contrib/systemd/$$example $(DESTDIR)$(DOCDIR)/examples/; done
	install -m 0644 contrib/grafana/icbd.json $(DESTDIR)$(DOCDIR)/grafana-icbd.json
	@echo "installed icbd in $(DESTDIR)$(LIBDIR); units in $(DESTDIR)$(UNITDIR): run systemctl daemon-reload"

uninstall:
	rm -f $(DESTDIR)$(BINDIR)/icbd $(DESTDIR)$(SBINDIR)/mount.fuse.icbd $(DESTDIR)$(MANDIR)/man1/icbd.1 \
		$(DESTDIR)$(COMPLETIONDIR)/icbd $(DESTDIR)$(DOCDIR)/grafana-icbd.json
	for unit in $(UNITS); do rm -f $(DESTDIR)$(UNITDIR)/$$unit; done
	for example in $(EXAMPLES); do rm -f $(DESTDIR)$(DOCDIR)/examples/$$example; done
	-rmdir $(DESTDIR)$(DOCDIR)/examples $(DESTDIR)$(DOCDIR) 2>/dev/null
	# the config file only if it is still the sample: an edited one is the admin's
	if cmp -s $(DESTDIR)$(SYSCONFDIR)/icbd/icbd.toml $(DESTDIR)$(SYSCONFDIR)/icbd/icbd.toml.sample; then \
		rm -f $(DESTDIR)$(SYSCONFDIR)/icbd/icbd.toml; \
	fi
	rm -f $(DESTDIR)$(SYSCONFDIR)/icbd/icbd.toml.sample
	-rmdir $(DESTDIR)$(SYSCONFDIR)/icbd 2>/dev/null
	rm -rf $(DESTDIR)$(LIBDIR)

clean:
	rm -rf $(VENV) build bench-out demo-out
