"""The agent process: keep this node's data plane loaded, attached and equal
to its configuration file.

Start: load the objects re-using the maps pinned by a previous agent (their
contents, connections' cookies and counters survive), atomically replace the
program on every configured interface, pin it. A map the previous agent did
not pin (an upgrade enlarged it, or renamed it because its layout changed)
starts empty, so then the new program goes in only once a configuration has
filled it; until then the previous program serves on its own maps. Run:
re-read the file on SIGHUP or when inotify sees it change; a file that fails
validation is logged and counted and the last good configuration keeps
serving. SIGTERM and SIGINT end the process and leave the data plane running;
`uninstall`, or in cluster mode the pool's retirement instruction, removes it.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import select
import signal
import subprocess
import time
from dataclasses import dataclass
from datetime import datetime, timezone

from synfleet import abi
from synfleet.agent import notrack
from synfleet.agent.hooks import Hooks, HookStatus, detach_everything, legacy_interfaces_running
from synfleet.agent.links import LinkEvents
from synfleet.agent.metrics import AgentState, serve
from synfleet.agent.pins import DEFAULT_ROOT, XDP_PIN, PinDir
from synfleet.agent.report import NodeReporter, ReportOptions
from synfleet.agent.sources import FileSource, KubeSource, KubeSourceOptions
from synfleet.agent.xdpwatch import XdpTxWatch
from synfleet.bpf import BpfError
from synfleet.config import schema
from synfleet.contract import timestamp
from synfleet.cookie import MasterKey, current_epoch, key_for, salts_for
from synfleet.dataplane.programs import Dataplane, ProxyDataplane, dataplane_for

log = logging.getLogger("synfleet.agent")
TICK_S = 1.0      # salt epoch bookkeeping and liveness, not configuration (that is event driven)
# A starting agent in cluster mode waits this long for its ConfigMap and Secret
# before going on without them (the API server may be the thing that is down).
SYNC_WAIT_S = 10.0
# Salts are loaded this far ahead (at most abi.SALT_SLOTS epochs): the data
# plane keeps answering SYNs this long after its agent and control plane are gone.
SALTS_AHEAD_S = 7200


def salt_window(rotation_seconds: int, now_epoch: int) -> range:
    """The epochs whose salts a proxy holds: the previous one (its cookies are
    still good) to SALTS_AHEAD_S ahead."""
    ahead = min(abi.SALT_SLOTS - 2, max(2, math.ceil(SALTS_AHEAD_S / rotation_seconds)))
    return range(now_epoch - 1, now_epoch + ahead + 1)


@dataclass(frozen=True)
class AgentOptions:
    role: schema.Role
    instance: str
    config_path: str | None = None          # file mode
    kube: KubeSourceOptions | None = None   # cluster mode
    pin_root: str = DEFAULT_ROOT
    listen: str | None = "127.0.0.1:9478"
    objects_dir: str | None = None
    report: ReportOptions | None = None     # cluster mode: keep this node's NodeAgent object


class Agent:
    def __init__(self, opts: AgentOptions) -> None:
        self.opts = opts
        self.pins = PinDir(opts.pin_root, opts.instance)
        self.state = AgentState(role=opts.role.value, instance=opts.instance)
        self.state.alive = self._alive
        self.state.not_ready = self._not_ready
        self.dataplane: Dataplane | None = None
        self._inherited = False         # the maps hold a previous agent's configuration
        self._first_error: str | None = None   # why no configuration was ever applied
        self.config: schema.DataplaneConfig | None = None
        self._config_digest: str | None = None
        self._rejected_digest: str | None = None   # the bad file is reported once
        self.hooks: Hooks | None = None
        self._tc: dict[str, HookStatus] = {}     # by interface, as the kernel last showed them
        self._xdp: dict[str, HookStatus] = {}
        self._inherited_interfaces: list[str] = []   # where the previous agent's program runs
        self._xdp_off: dict[str, str] = {}       # interface -> why the XDP front was taken away
        self._xdp_watch = XdpTxWatch()
        self._ours: set[int] = set()        # TC program ids of this instance (previous and current)
        self._ours_xdp: set[int] = set()
        self._last_tick = time.monotonic()
        self._stop = False
        self._reload = False
        self._last_error: str | None = None
        self._salts: dict[int, bytes] = {}       # derived so far, by epoch ...
        self._salts_keys: list[MasterKey] = []   # ... from these master keys
        self._swap_pending = False      # the new program waits for a configuration (see start)
        self._config_version: str | None = None    # the source's version of the applied document
        self.retired: str | None = None     # why this node was left bare
        self._notrack_error: str | None = None   # backends: why the conntrack exemption is missing
        self.source = FileSource(opts.config_path) if opts.kube is None else KubeSource(opts.kube)
        self.reporter = NodeReporter(self.source.kube, opts.role, opts.report, self._node_status) \
            if opts.report and isinstance(self.source, KubeSource) else None

    # ---- start ----

    def start(self) -> None:
        self.pins.create()
        previous_program = self.pins.pinned_program_id()
        self.dataplane = dataplane_for(self.opts.role, self.pins.path, self.opts.objects_dir)
        log.info("data plane loaded", extra={"pins": self.pins.path, "reused_maps": self.dataplane.reused,
                                              "new_maps": self.dataplane.fresh,
                                              "program_id": self.dataplane.program.id,
                                              "replaces_program_id": previous_program})
        self._ours = {self.dataplane.program.id} | ({previous_program} if previous_program else set())
        self._ours_xdp = {self.pins.pinned_program_id(XDP_PIN)} - {None}
        if isinstance(self.dataplane, ProxyDataplane):
            self._ours_xdp.add(self.dataplane.xdp_program.id)
        self.hooks = Hooks(self.pins, schema.Attach(), place=False)   # until a configuration says
        self._inherited_interfaces = sorted(set(self.hooks.linked_interfaces("tcx"))
                                            | set(legacy_interfaces_running(self._ours)))
        self._inherited = self.dataplane.applied()
        self.source.wait_synced(SYNC_WAIT_S)
        self.reload()
        if self.config is None and self.dataplane.fresh and previous_program is not None:
            # The new program would run on empty maps (no salts: every SYN
            # would meet the failure policy); the previous one keeps serving.
            self._swap_pending = True
            log.warning("the new program waits for a configuration to fill its new maps; "
                        "the previous program keeps serving", extra={"new_maps": self.dataplane.fresh})
            return
        self._swap_in()

    def _swap_in(self) -> None:
        """Pin the maps and put the new programs on the hooks. A configuration
        error must not leave the interfaces with the old programs forever: the
        new ones read the same maps, swap them in. Readiness says the upgrade
        waits until the hooks run the new program, not only until it began."""
        self.dataplane.pin_maps(self.pins.path)
        self.pins.pin_program(self.dataplane.program)
        if isinstance(self.dataplane, ProxyDataplane):
            self.pins.pin_program(self.dataplane.xdp_program, XDP_PIN)
        # Maps of a previous release that this one renamed or dropped. Unpinned
        # before the hooks change (a program still on a hook keeps its maps
        # alive): readiness, which the kernel's hooks decide, then means done.
        stale = self.pins.prune(keep=set(self.dataplane.MAPS) | {"program", XDP_PIN},
                                keep_prefixes=("tcx-", "xdp-"))
        if stale:
            log.info("unpinned maps of the previous release", extra={"maps": stale})
        self._reconcile_hooks(swapping=True)
        self._swap_pending = False

    def _wanted(self) -> tuple[list[str], list[str]]:
        """The interfaces whose TC ingress, and whose XDP slot, should run ours."""
        if self.config is None:
            return self._inherited_interfaces, self.hooks.linked_interfaces("xdp")
        interfaces = list(self.config.node.interfaces)
        xdp = [n for n in interfaces if self.config.node.xdp and n not in self._xdp_off]
        return interfaces, xdp

    def _reconcile_hooks(self, swapping: bool = False) -> None:
        """Make the kernel run our programs where wanted and nowhere else, and
        record what it shows. Cheap and idempotent: runs on every link event
        and every tick, so a recreated interface or a detached program is back
        within a tick, and readiness never trusts memory. While an upgrade
        waits, only its swap (`swapping`) touches the hooks."""
        if (self._swap_pending and not swapping) or self.retired or self.dataplane is None:
            return
        interfaces, xdp = self._wanted()
        tc = {n: self.hooks.ensure_tc(n, self.dataplane.program, self._ours) for n in interfaces}
        for name in set(self._tc) - set(tc):
            self.hooks.remove_tc(name, self._ours)
            log.info("detached", extra={"interface": name})
        front = {}
        if isinstance(self.dataplane, ProxyDataplane):
            front = {n: self.hooks.ensure_xdp(n, self.dataplane.xdp_program, self._ours_xdp) for n in xdp}
            for name in set(self.hooks.linked_interfaces("xdp")) - set(front):
                self.hooks.remove_xdp(name)
                log.info("XDP front detached", extra={"interface": name})
        for status in list(tc.values()) + list(front.values()):
            before = (self._xdp if status.hook == "xdp" else self._tc).get(status.interface)
            if status.error and (before is None or before.error != status.error):
                log.error("hook not in place", extra={"interface": status.interface, "hook": status.hook,
                                                      "error": status.error})
            elif status.sharing and (before is None or before.sharing != status.sharing):
                log.info("sharing the hook", extra={"interface": status.interface, "hook": status.hook,
                                                    "programs": status.sharing})
        self._tc, self._xdp = tc, front
        self.state.tc_hook = self.hooks.tc_kind
        self.state.hooks = sorted(n for n, st in tc.items() if st.attached)
        self.state.xdp_hooks = sorted(n for n, st in front.items() if st.attached)
        self.state.hooks_missing = sorted((st.interface, st.hook) for st in list(tc.values()) + list(front.values())
                                          if not st.attached)

    def _watch_xdp(self) -> None:
        """Take the XDP front away where its replies do not leave (XDP_TX
        failing in the driver): the TC program answers there instead."""
        answered = self.dataplane.counter_values().get(abi.Counter.SYN_ANSWERED, 0)
        for name in self.state.xdp_hooks:
            why = self._xdp_watch.failing(name, answered)
            if why:
                self._xdp_off[name] = why
                self.state.xdp_fallbacks[name] = self.state.xdp_fallbacks.get(name, 0) + 1
                log.error("XDP front taken away: its replies are not leaving; the TC program answers "
                          "SYNs here", extra={"interface": name, "reason": why})
        if any(n in self._xdp_off for n in self.state.xdp_hooks):
            self._reconcile_hooks()

    # ---- configuration ----

    def reload(self) -> bool:
        """Apply the document if it changed and is valid; True when the maps match it."""
        try:
            text = self.source.read()
            digest = hashlib.sha256(text.encode()).hexdigest()
            if digest == self._config_digest:
                self._config_version = self.source.version
                return True
            if digest == self._rejected_digest:
                return False
            self._rejected_digest = digest
            cfg = schema.loads(text)
            if cfg.role is not self.opts.role:
                raise schema.ConfigError(f"role: the document is for a {cfg.role.value}, "
                                         f"this agent runs --role {self.opts.role.value}")
            same = self.config is not None and self.hooks.attach == cfg.node.attach
            hooks = self.hooks if same else self._hooks_for(cfg.node.attach)
        except schema.ConfigError as err:
            self.state.config_errors += 1
            self._last_error = str(err)
            log.error("configuration rejected; the last good one keeps serving",
                      extra={"source": self.source.describe(), "error": str(err)})
            if self.config is None:
                self._first_error = str(err)
            return False
        self.hooks = hooks
        self._apply(cfg)
        self._config_digest = digest
        self._config_version = self.source.version
        return True

    def _hooks_for(self, attach: schema.Attach) -> Hooks:
        try:
            return Hooks(self.pins, attach)
        except BpfError as err:
            raise schema.ConfigError(f"node.attach: {err.strerror}") from err

    def _apply(self, cfg: schema.DataplaneConfig) -> None:
        dp = self.dataplane
        if self.config is None or cfg.node != self.config.node:
            self._xdp_off = {}      # a new node configuration tries the XDP front again
        if isinstance(dp, ProxyDataplane):
            # Salts first: a new configuration never names an epoch without its key.
            self._load_salts(cfg)
        slot = dp.apply(cfg)
        if self.opts.role is schema.Role.BACKEND:
            self._exempt_from_conntrack(cfg)
        self.config = cfg
        self.state.config_generation += 1
        self.state.last_sync = time.time()
        self._tick()
        log.info("configuration applied", extra={
            "generation": self.state.config_generation, "active_slot": slot,
            "policies": [p.id for p in cfg.policies],
            "salt_generations": [k.generation for k in cfg.salt_keys]})

    def _exempt_from_conntrack(self, cfg: schema.DataplaneConfig) -> None:
        """See agent/notrack.py: without it, kube-proxy's netfilter rules make
        the kernel reset every validated handshake."""
        try:
            notrack.install(self.opts.instance, [s for p in cfg.policies for s in p.services])
            self._notrack_error = None
        except (notrack.NotrackError, OSError, subprocess.TimeoutExpired) as err:
            self._notrack_error = str(err)
            log.error("protected services not exempt from connection tracking: on a node with netfilter "
                      "NAT (kube-proxy) validated handshakes are reset", extra={"error": str(err)})

    def _load_salts(self, cfg: schema.DataplaneConfig) -> None:
        """Derive the salts of the window around the node's current epoch from
        the master keys and make the salt map hold them."""
        epoch = current_epoch(cfg.rotation_seconds, cfg.node.clock_offset_seconds)
        window = salt_window(cfg.rotation_seconds, epoch)
        keys = cfg.master_keys
        if keys != self._salts_keys:
            self._salts, self._salts_keys = {}, keys
        # Each new epoch derives one salt, not the whole window again.
        known = {e: s for e, s in self._salts.items() if e in window}
        self._salts = known | salts_for(keys, (e for e in window if e not in known))
        self.dataplane.set_salts(self._salts)
        self.state.salts_published = set(self._salts)
        self.state.salts_loaded_for = epoch
        self.state.rotation_seconds = cfg.rotation_seconds

    # ---- run ----

    def _salt_status(self) -> tuple[int, bool] | None:
        """For a configured proxy: the node's current epoch, and whether it has a salt."""
        if self.config is None or self.opts.role is not schema.Role.PROXY:
            return None
        epoch = current_epoch(self.config.rotation_seconds, self.config.node.clock_offset_seconds)
        return epoch, epoch in self.state.salts_published

    def _tick(self) -> None:
        self._last_tick = time.monotonic()
        self._end_drains()
        status = self._salt_status()
        if status is None or status[0] == self.state.salt_epoch:
            return
        epoch, _ = status
        if self.state.salts_loaded_for != epoch:
            self._load_salts(self.config)        # the window moves on: one epoch more ahead
        published = epoch in self.state.salts_published
        self.state.salt_epoch = epoch
        if not published:
            log.error("no salt for the current epoch: %s until the pool's master key covers it",
                      self._without_salt(), extra={"epoch": epoch,
                                                   "generations": [k.generation for k in self.config.salt_keys]})

    def _end_drains(self) -> None:
        """A previous backend whose drain period ended leaves the proxy's slots."""
        dp = self.dataplane
        if not isinstance(dp, ProxyDataplane) or self.config is None:
            return
        ends = dp.next_expiry()
        if ends is not None and ends <= self._last_tick:
            dp.apply(self.config)
            log.info("drain periods ended", extra={"previous_backends": {
                name: sorted(map(str, named)) for name, named in dp.previous_backends().items() if named}})

    def _without_salt(self) -> str:
        if self.config.failure_policy is schema.FailurePolicy.OPEN:
            return "SYNs go to the backends unguarded (failurePolicy open)"
        return "SYNs are dropped (failurePolicy closed)"

    def _not_ready(self) -> str | None:
        if self.retired:
            return f"retired: {self.retired}"
        if self._swap_pending:
            return (f"upgrade waiting for a configuration to fill its new maps "
                    f"({', '.join(self.dataplane.fresh)}); the previous program serves")
        if self.config is None and not self._inherited:
            return f"no valid configuration yet: {self._first_error}" if self._first_error else "starting"
        missing = [f"{st.hook} on {st.interface}: {st.error}" for st in self._tc.values() if not st.attached]
        if missing:
            return "; ".join(missing)
        if self._notrack_error:
            return f"connection tracking exemption not installed: {self._notrack_error}"
        no_front = [f"no XDP front on {st.interface}: {st.error}" for st in self._xdp.values() if not st.attached]
        no_front += [f"XDP front on {name} taken away: {why}; the TC program answers"
                     for name, why in self._xdp_off.items()]
        if no_front:
            return "; ".join(no_front)
        status = self._salt_status()
        if status is not None and not status[1]:
            return f"no salt for epoch {status[0]}: {self._without_salt()}"
        return None

    def _node_status(self, counters: bool) -> dict:
        """What the NodeAgent object says (see agent/report.py)."""
        programs = [{"interface": st.interface, "hook": st.hook, "programId": st.program_id,
                     **({"sharing": st.sharing} if st.sharing else {})}
                    for hooks in (self._tc, self._xdp) for _, st in sorted(hooks.items())]
        not_ready = self._not_ready()
        status = {"programs": programs, "configGeneration": self.state.config_generation,
                  "notReady": not_ready, "retired": self.retired,
                  "degraded": not_ready if self.config is not None else None}
        if self._config_version is not None:
            status["configVersion"] = self._config_version
        if counters:
            status["counters"] = {c.name.lower(): v for c, v in self.dataplane.counter_values().items()}
        if self.state.last_sync is not None:
            status["lastApplied"] = timestamp(datetime.fromtimestamp(self.state.last_sync, timezone.utc))
        if self._last_error:
            status["lastError"] = self._last_error[:4096]
        cfg = self.config
        if cfg is not None and self.opts.role is schema.Role.PROXY and self.state.salt_epoch is not None:
            epoch = self.state.salt_epoch
            key = key_for(cfg.master_keys, epoch)
            status.update(failurePolicy=cfg.failure_policy.value, saltEpoch=epoch,
                          saltEpochsAhead=self.state.salt_epochs_ahead,
                          **({"saltGeneration": key.generation} if key else {}))
        return status

    def _alive(self) -> bool:
        return time.monotonic() - self._last_tick < 10 * TICK_S

    def run(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_stop)
        signal.signal(signal.SIGHUP, self._on_hup)
        server = serve(self.opts.listen, self.state, self.dataplane.counter_values) \
            if self.opts.listen else None
        watch = self.source
        links = LinkEvents()
        # Signals wake the loop at once instead of at the next tick.
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wake_w)
        log.info("agent running", extra={"instance": self.opts.instance, "listen": self.opts.listen,
                                         "hooks": self.state.hooks})
        if self.reporter:
            self.reporter.start()
        try:
            while not self._stop:
                try:
                    ready, _, _ = select.select([watch, wake_r, links], [], [], TICK_S)
                except InterruptedError:
                    ready = []
                if wake_r in ready:
                    os.read(wake_r, 512)
                if links in ready:
                    links.drain()       # what changed does not matter: the kernel is asked again
                if watch in ready and watch.changed():
                    self._reload = True
                if self._reload and not self.retired:
                    self._reload = False
                    self._follow_source()
                self._tick()
                self._reconcile_hooks()
                self._watch_xdp()
        finally:
            links.close()
            signal.set_wakeup_fd(-1)
            os.close(wake_r)
            os.close(wake_w)
            if self.reporter:
                self.reporter.stop()
            watch.close()
            if server:
                server.shutdown()
            log.info("agent stopped; the data plane keeps running",
                     extra={"hooks": self.state.hooks, "pins": self.pins.path})

    def _follow_source(self) -> None:
        why = self.source.retirement()
        if why:
            self._retire(why)
        elif self.reload():
            if self._swap_pending:
                self._swap_in()
            else:
                self._reconcile_hooks()

    def _retire(self, why: str) -> None:
        """Leave the node bare: every hook of this instance detached, every pin
        removed. The process stays (idle) to report it until its DaemonSet goes."""
        detached = uninstall(self.opts.instance, self.opts.pin_root) or []
        self._tc, self._xdp, self._xdp_off, self._swap_pending = {}, {}, {}, False
        self.config, self.retired = None, why
        self.state.hooks, self.state.xdp_hooks = [], []
        log.info("retired: the node is bare", extra={"reason": why, "detached": detached})

    def _on_stop(self, signum: int, _frame: object) -> None:
        self._stop = True

    def _on_hup(self, signum: int, _frame: object) -> None:
        self._reload = True


def uninstall(instance: str, pin_root: str = DEFAULT_ROOT) -> list[str] | None:
    """Detach the instance's hooks in this network namespace and remove its
    pins. Returns the interfaces it detached from, None if nothing was installed."""
    pins = PinDir(pin_root, instance)
    if not pins.exists():
        return None
    detached = detach_everything(pins, {pins.pinned_program_id()} - {None},
                                 {pins.pinned_program_id(XDP_PIN)} - {None})
    pins.remove()
    try:
        notrack.remove(instance)
    except (notrack.NotrackError, OSError, subprocess.TimeoutExpired) as err:
        log.warning("connection tracking exemption not removed", extra={"error": str(err)})
    return detached
