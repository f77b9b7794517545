"""Hosts as Linux network namespaces, wired to switches (bridges) that the test itself creates, and partitions
as links taken down and up (this kernel has no netem).

Nothing outside the namespaces is touched: every veth pair is created directly between a host's namespace
and its switch's namespace, every address is assigned inside them (10.77.x.y/24 by the tests), and
:meth:`Network.close` deletes every namespace (their links go with them). Names carry the test process's
pid and a counter, so leftovers of a run that was killed before its clean-up never collide with a new run.
Needs root and ``ip netns``: :func:`unavailable` says why not, for a skip.
"""

from __future__ import annotations

import itertools
import os
import subprocess

_COUNTER = itertools.count()


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


def unavailable() -> str | None:
    """Why network namespaces cannot be made here (None: they can)."""
    if os.geteuid() != 0:
        return "network namespaces need root (CI runs the suite as root)"
    probe = f"mecefo-probe-{os.getpid()}"
    try:
        _ip("netns", "add", probe)
    except (OSError, subprocess.CalledProcessError) as e:
        return f"`ip netns add` is not permitted here: {getattr(e, 'stderr', '') or e}".strip()
    _ip("netns", "del", probe)
    return None


class Network:
    """Switches and hosts (namespaces); ``close()`` removes them all."""

    def __init__(self):
        self.tag = f"m{os.getpid()}x{next(_COUNTER)}"
        self.namespaces: list[str] = []
        self.links: dict[tuple[str, str], str] = {}  # (host, switch) -> the link's name in the switch namespace
        self.interfaces: dict[tuple[str, str], str] = {}  # (host, switch) -> its interface in the host
        self.switch_ns = self._namespace("sw")

    def _namespace(self, name: str) -> str:
        ns = f"{self.tag}-{name}"
        _ip("netns", "add", ns)
        self.namespaces.append(ns)
        _ip("-n", ns, "link", "set", "lo", "up")
        return ns

    def ns(self, host: str) -> str:
        return f"{self.tag}-{host}"

    def add_switch(self, switch: str) -> None:
        _ip("-n", self.switch_ns, "link", "add", switch, "type", "bridge")
        _ip("-n", self.switch_ns, "link", "set", switch, "up")

    def add_host(self, host: str, links: dict[str, str]) -> None:
        """A host with one interface per switch (``{switch: "10.77.0.2/24"}``), named after the switch."""
        ns = self._namespace(host)
        for i, (switch, address) in enumerate(links.items()):
            outer = f"{host[:6]}{switch[:4]}{i}"  # in the switch namespace (<= 15 characters)
            _ip("link", "add", switch, "netns", ns, "type", "veth", "peer", "name", outer, "netns", self.switch_ns)
            _ip("-n", self.switch_ns, "link", "set", outer, "master", switch)
            _ip("-n", self.switch_ns, "link", "set", outer, "up")
            _ip("-n", ns, "addr", "add", address, "dev", switch)
            _ip("-n", ns, "link", "set", switch, "up")
            self.links[(host, switch)] = outer
            self.interfaces[(host, switch)] = switch

    def cut(self, host: str, *switches: str) -> None:
        """Unplug ``host`` from ``switches`` (all of its switches if none named): packets are dropped, no
        connection is closed (as when a cable or a switch port fails)."""
        for (h, switch), outer in self.links.items():
            if h == host and (not switches or switch in switches):
                _ip("-n", self.switch_ns, "link", "set", outer, "down")

    def heal(self, host: str, *switches: str) -> None:
        for (h, switch), outer in self.links.items():
            if h == host and (not switches or switch in switches):
                _ip("-n", self.switch_ns, "link", "set", outer, "up")

    def command(self, host: str, cmd: list[str]) -> list[str]:
        """``cmd`` run inside ``host``'s namespace."""
        return ["ip", "netns", "exec", self.ns(host), *cmd]

    def close(self) -> None:
        for ns in reversed(self.namespaces):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
        self.namespaces.clear()
