#!/usr/bin/env python3
"""OSDP test peer: a simulated RS-485 multi-drop bus of libosdp Peripheral Devices.

The gateway under test is the OSDP Control Panel (CP). This script plays the
readers on the other end of the wire, using the third-party `libosdp` Python
package (PyPI `libosdp` 3.2.x), so the CP is tested against an OSDP stack
nobody on this project wrote.

The bus is a pseudo-terminal. The slave side is set raw, `--link PATH` is made
a symlink to it (an existing symlink is replaced) and the slave is closed
again: the CP opens PATH as its serial port. This process keeps the master.
Every byte the CP writes reaches every PD, as on a multi-drop line (libosdp
drops packets addressed to other PDs); whatever a PD writes goes to the CP.
The CP may close and reopen the port at any time (a gateway restart). The
symlink is removed when this script ends.

Usage:
    pd_bus.py --link PATH --pd SPEC [--pd SPEC ...] [--log LEVEL]

    SPEC is ADDR[,option...] with ADDR in 0..126 and options:
        scbk=<32 hex chars>  the PD's secure channel base key. Without one,
                             libosdp itself puts the PD in install mode (it
                             accepts the default key SCBK-D).
        install              flag InstallMode (accept SCBK-D, for provisioning)
        enforce              flag EnforceSecure (no plaintext, no SCBK-D; needs scbk)
        display              add the text output capability
        dead                 listed but never answers: no PD is created, so the
                             CP sees silence at that address
    Every live PD has 4 outputs, LED control (one LED: led_number 0), audible
    output, 4 inputs, communication security and card data format (plus text
    output with `display`). libosdp NAKs a command beyond these (e.g. LED 1,
    or text without `display`) before this script sees it.

    LEVEL is error, warning (default), notice, info or debug. libosdp logs go
    to stderr only.

Control, on stdin: one JSON object per line.
    {"op":"card","pd":1,"format":"wiegand"|"raw","bits":26,"data":"HEX"}
        a card read (osdp_RAW). "bits" defaults to 8 * bytes of data.
    {"op":"keys","pd":1,"data":"HEX"}
        a keypress event with these raw bytes (ASCII digits, 0x0D '#', 0x7F '*')
    {"op":"status","pd":1,"type":"local"|"input"|"output","report":[0,1,...]}
        a status report event. local: [tamper, power]; input/output: one entry
        per point (1 = active), padded with 0 to the 4 points. The values are
        sent unsolicited, as the reply to the CP's next poll. (Status polls from
        the CP, osdp_LSTAT/ISTAT/OSTAT, are NAKed: libosdp 3.2.9's Python
        binding cannot answer them.)
    {"op":"quit"}
        stop all PDs and exit 0. End of stdin does the same.

Reports, on stdout: one JSON object per line, flushed at once.
    {"ev":"ready","link":"PATH"}
        the link exists and the PDs run.
    {"ev":"command","pd":1,"cmd":{...}}
        a command reached PD 1, which acknowledges it (status polls excepted,
        see above). "cmd" is libosdp's command dict with bytes turned into
        hex strings, plus "name": output, led, buzzer, text, keyset, comset,
        comset_done, mfg, file_tx, status. On "keyset", "data" is the new
        SCBK, and libosdp makes it the PD's key (in memory only).
    {"ev":"state","pd":1,"online":true,"sc":true}
        PD 1's online or secure-channel state changed (sampled every 50 ms).
    {"ev":"error","msg":"..."}
        a malformed stdin line, or an op that could not be done.
"""

import argparse
import errno
import json
import os
import select
import signal
import sys
import threading
import time
import tty

# libosdp is imported in main(), after stdout is made safe (see protect_stdout).
osdp = None

NUM_OUTPUTS = 4
NUM_INPUTS = 4
# Bytes kept per PD when it does not consume its input (it never should).
MAX_RX_BACKLOG = 64 * 1024

LOG_LEVELS = ("error", "warning", "notice", "info", "debug")


# --------------------------------------------------------------------------
# Machine-readable output
# --------------------------------------------------------------------------

class Reporter:
    """Writes one JSON object per line to the real stdout, thread-safely."""

    def __init__(self, stream):
        self._stream = stream
        self._lock = threading.Lock()

    def emit(self, obj):
        line = json.dumps(obj, separators=(",", ":")) + "\n"
        with self._lock:
            try:
                self._stream.write(line)
                self._stream.flush()
            except (BrokenPipeError, ValueError):
                pass  # the reader went away; EOF on stdin ends us

    def error(self, msg):
        self.emit({"ev": "error", "msg": msg})


def protect_stdout():
    """Keeps fd 1 for our JSON only.

    libosdp's C logger writes to stderr, but the bindings also print() from
    some error paths. So the real stdout is duplicated for the reports, and
    fd 1 (and sys.stdout) now lead to stderr: nothing else can reach the
    machine-readable channel.
    """
    sys.stdout.flush()
    real = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return os.fdopen(real, "w", encoding="utf-8")


def jsonable(value):
    """libosdp dict values as JSON: bytes become hex strings."""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).hex()
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


# --------------------------------------------------------------------------
# The bus
# --------------------------------------------------------------------------

class Bus:
    """The pty master: one reader thread fans the CP's bytes out to every PD."""

    def __init__(self, master_fd):
        self.fd = master_fd
        os.set_blocking(self.fd, False)
        self.channels = []
        self._write_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(name="bus-rx", target=self._rx, daemon=True)

    def attach(self, channel):
        self.channels.append(channel)

    def start(self):
        self._thread.start()

    def stop(self):
        self._stop.set()
        self._thread.join(1)

    def _rx(self):
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        while not self._stop.is_set():
            if not poller.poll(20):
                continue
            try:
                data = os.read(self.fd, 4096)
            except BlockingIOError:
                continue
            except OSError as e:
                if e.errno != errno.EIO:
                    raise
                # Nobody has the slave open (not yet, or the CP closed it).
                # poll() keeps reporting the hang-up, so back off.
                time.sleep(0.005)
                continue
            if not data:
                time.sleep(0.005)
                continue
            for channel in self.channels:
                channel.feed(data)

    def write(self, buf):
        """Puts a PD's bytes on the wire; returns how many were taken.

        Never blocks for long: when the CP does not read (e.g. it closed the
        port) the bytes are dropped, as on a line nobody listens to.
        """
        view = memoryview(buf)
        deadline = time.monotonic() + 0.05
        with self._write_lock:
            while view:
                try:
                    n = os.write(self.fd, view)
                    view = view[n:]
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        break
                    time.sleep(0.001)
                except OSError as e:
                    if e.errno != errno.EIO:
                        raise
                    break
        return len(buf)


def make_channel_class():
    class BusChannel(osdp.Channel):
        """One PD's view of the bus: a receive buffer fed by the bus thread."""

        def __init__(self, bus):
            super().__init__()
            self._bus = bus
            self._rx = bytearray()
            self._lock = threading.Lock()

        def feed(self, data):
            with self._lock:
                self._rx += data
                if len(self._rx) > MAX_RX_BACKLOG:
                    del self._rx[:-MAX_RX_BACKLOG]

        # The three methods libosdp calls from the PD's refresh thread; none blocks
        # and none raises (an exception here would surface inside the C library).
        def read(self, max_bytes):
            with self._lock:
                data = bytes(self._rx[:max_bytes])
                del self._rx[:max_bytes]
            return data

        def write(self, buf):
            try:
                return self._bus.write(buf)
            except OSError:
                return -1

        def flush(self):
            with self._lock:
                self._rx.clear()

    return BusChannel


# --------------------------------------------------------------------------
# Peripheral devices
# --------------------------------------------------------------------------

class PdSpec:
    def __init__(self, addr):
        self.addr = addr
        self.scbk = None
        self.install = False
        self.enforce = False
        self.display = False
        self.dead = False


def parse_spec(text):
    """ADDR[,scbk=HEX][,install][,enforce][,display][,dead]"""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
        raise argparse.ArgumentTypeError("empty PD spec")
    try:
        addr = int(parts[0])
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad PD address {parts[0]!r}")
    if not 0 <= addr <= 126:
        raise argparse.ArgumentTypeError(f"PD address {addr} not in 0..126")
    spec = PdSpec(addr)
    for opt in parts[1:]:
        key, _, value = opt.partition("=")
        if key == "scbk":
            try:
                spec.scbk = bytes.fromhex(value)
            except ValueError:
                spec.scbk = None
            if spec.scbk is None or len(spec.scbk) != 16:
                raise argparse.ArgumentTypeError(f"scbk must be 32 hex chars: {value!r}")
        elif key in ("install", "enforce", "display", "dead") and not value:
            setattr(spec, key, True)
        else:
            raise argparse.ArgumentTypeError(f"unknown PD option {opt!r}")
    if spec.enforce and spec.scbk is None and not spec.dead:
        raise argparse.ArgumentTypeError(f"PD {addr}: enforce needs scbk= (libosdp refuses it)")
    return spec


def command_names():
    """libosdp command ids -> short names for the reports."""
    names = {}
    for attr, name in (("Output", "output"), ("LED", "led"), ("Buzzer", "buzzer"),
                       ("Text", "text"), ("Keyset", "keyset"), ("Comset", "comset"),
                       ("ComsetDone", "comset_done"), ("Manufacturer", "mfg"),
                       ("FileTransfer", "file_tx"), ("Status", "status")):
        if hasattr(osdp.Command, attr):
            names[getattr(osdp.Command, attr)] = name
    return names


class SimPd:
    """One libosdp PeripheralDevice on the bus and its reports."""

    def __init__(self, spec, bus, channel_class, reporter, log_level, cmd_names):
        self.addr = spec.addr
        self.reporter = reporter
        self.cmd_names = cmd_names
        self.seen = (False, False)  # (online, sc) last reported

        channel = channel_class(bus)
        bus.attach(channel)
        flags = []
        if spec.install:
            flags.append(osdp.LibFlag.InstallMode)
        if spec.enforce:
            flags.append(osdp.LibFlag.EnforceSecure)
        info = osdp.PDInfo(spec.addr, channel, scbk=spec.scbk,
                           name=f"PD-{spec.addr}", flags=flags)
        cap = osdp.Capability
        caps = [
            (cap.OutputControl, 1, NUM_OUTPUTS),
            (cap.LEDControl, 1, 1),
            (cap.AudibleControl, 1, 1),
            (cap.ContactStatusMonitoring, 1, NUM_INPUTS),
            (cap.CommunicationSecurity, 1, 1),
            (cap.CardDataFormat, 1, 1),
        ]
        if spec.display:
            caps.append((cap.TextOutput, 1, 1))
        self.pd = osdp.PeripheralDevice(info, osdp.PDCapabilities(caps),
                                        log_level=log_level,
                                        command_handler=self._on_command)

    def start(self):
        self.pd.start()

    def stop(self):
        try:
            self.pd.stop()
        except RuntimeError:
            pass

    # Called by libosdp inside the PD's refresh, with the PD lock held: do not
    # call back into the PD from here. Returning (0, None) makes the PD ACK.
    #
    # Status polls (osdp_LSTAT/ISTAT/OSTAT) also arrive here, as a "status"
    # command. The answer would be a (0, {"command": Status, "type": t,
    # "report": ...}) reply, but the libosdp 3.2.9 binding drops "report" when
    # converting it, so the PD NAKs every status poll whatever is returned.
    # Unsolicited status events (the "status" op) do reach the CP.
    def _on_command(self, cmd):
        report = jsonable(dict(cmd))
        report["name"] = self.cmd_names.get(cmd.get("command"), str(cmd.get("command")))
        self.reporter.emit({"ev": "command", "pd": self.addr, "cmd": report})
        return 0, None

    # -- events, from the stdin thread --

    def card(self, fmt, data, bits):
        formats = {"wiegand": osdp.CardFormat.Wiegand, "raw": osdp.CardFormat.Unspecified}
        if fmt not in formats:
            raise ValueError(f"card format must be wiegand or raw, not {fmt!r}")
        if bits is None:
            bits = len(data) * 8
        if not 0 < bits <= len(data) * 8:
            raise ValueError(f"{bits} bits do not fit in {len(data)} bytes of data")
        self._submit({"event": osdp.Event.CardRead, "reader_no": 0, "format": formats[fmt],
                      "direction": 0, "length": bits, "data": data})

    def keys(self, data):
        if not data:
            raise ValueError("no keys")
        self._submit({"event": osdp.Event.KeyPress, "reader_no": 0, "data": data})

    def status_event(self, kind, report):
        sizes = {"local": 2, "input": NUM_INPUTS, "output": NUM_OUTPUTS}
        types = {"local": osdp.StatusReportType.Local,
                 "input": osdp.StatusReportType.Input,
                 "output": osdp.StatusReportType.Output}
        if kind not in sizes:
            raise ValueError(f"status type must be local, input or output, not {kind!r}")
        if len(report) > sizes[kind]:
            raise ValueError(f"a {kind} report has at most {sizes[kind]} entries")
        if any(not isinstance(v, int) or not 0 <= v <= 255 for v in report):
            raise ValueError("report entries must be integers 0..255")
        values = list(report) + [0] * (sizes[kind] - len(report))
        self._submit({"event": osdp.Event.Status, "type": types[kind], "report": bytes(values)})

    def _submit(self, event):
        # Queued in the PD and sent as the reply to a later poll. With no CP
        # polling, events wait in the queue and go out once one does.
        if self.pd.submit_event(event) is False:
            raise RuntimeError("libosdp refused the event (queue full?)")

    # -- state watch --

    def poll_state(self):
        with self.pd.lock:
            now = (bool(self.pd.is_online()), bool(self.pd.is_sc_active()))
        if now != self.seen:
            self.seen = now
            self.reporter.emit({"ev": "state", "pd": self.addr,
                                "online": now[0], "sc": now[1]})


# --------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------

def make_link(path, target):
    """Points `path` at `target`, replacing an existing symlink atomically."""
    if os.path.lexists(path) and not os.path.islink(path):
        raise SystemExit(f"pd_bus: {path} exists and is not a symlink; not replacing it")
    tmp = f"{path}.{os.getpid()}.tmp"
    os.symlink(target, tmp)
    os.replace(tmp, path)


def handle_line(line, pds, reporter):
    """Runs one stdin command; returns False on quit."""
    try:
        msg = json.loads(line)
        if not isinstance(msg, dict):
            raise ValueError("not a JSON object")
        op = msg.get("op")
        if op == "quit":
            return False
        if op not in ("card", "keys", "status"):
            raise ValueError(f"unknown op {op!r}")
        addr = msg.get("pd")
        if addr not in pds:
            raise ValueError(f"no live PD at address {addr!r}")
        pd = pds[addr]
        if op == "card":
            pd.card(msg.get("format", "wiegand"), bytes.fromhex(msg["data"]), msg.get("bits"))
        elif op == "keys":
            pd.keys(bytes.fromhex(msg["data"]))
        else:
            report = msg.get("report")
            if not isinstance(report, list):
                raise ValueError("status needs a report list")
            pd.status_event(msg.get("type"), report)
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        reporter.error(f"{type(e).__name__}: {e} in line {line.strip()[:200]!r}")
    return True


def main():
    parser = argparse.ArgumentParser(description="Simulated OSDP PD bus on a pty (libosdp).")
    parser.add_argument("--link", required=True, help="symlink to create to the pty slave")
    parser.add_argument("--pd", required=True, action="append", type=parse_spec,
                        metavar="SPEC", help="ADDR[,scbk=HEX][,install][,enforce][,display][,dead]")
    parser.add_argument("--log", choices=LOG_LEVELS, default="warning", help="libosdp log level")
    args = parser.parse_args()

    addrs = [s.addr for s in args.pd]
    if len(set(addrs)) != len(addrs):
        parser.error("a PD address is given twice")

    reporter = Reporter(protect_stdout())

    global osdp
    import osdp as osdp_module
    osdp = osdp_module
    log_level = getattr(osdp.LogLevel, args.log.capitalize())

    master, slave = os.openpty()
    tty.setraw(slave)
    device = os.ttyname(slave)
    # Raw mode stays with the pty when the slave is closed (checked on Linux).
    # Not holding the slave makes the master read EIO until the CP opens the
    # port, like a line with nobody on it. Caveat: a CP that opens the port
    # exclusively (serialport-rs does, TIOCEXCL) and dies without closing it
    # cleanly leaves the flag set, and a non-root reopen then fails with EBUSY.
    os.close(slave)

    bus = Bus(master)
    channel_class = make_channel_class()
    names = command_names()
    pds = {}
    for spec in args.pd:
        if spec.dead:
            continue
        try:
            pds[spec.addr] = SimPd(spec, bus, channel_class, reporter, log_level, names)
        except Exception as e:  # libosdp refuses a setup with a bare Exception
            raise SystemExit(f"pd_bus: PD {spec.addr}: libosdp setup failed: {e}")

    make_link(args.link, device)
    bus.start()
    for pd in pds.values():
        pd.start()

    stop = threading.Event()

    def watch():
        while not stop.wait(0.05):
            for pd in pds.values():
                pd.poll_state()

    watcher = threading.Thread(name="state-watch", target=watch, daemon=True)
    watcher.start()

    # SIGTERM/SIGINT: leave as cleanly as on quit.
    def on_signal(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_signal)

    reporter.emit({"ev": "ready", "link": args.link})

    try:
        for raw in sys.stdin.buffer:
            line = raw.decode("utf-8", errors="replace")
            if not line.strip():
                continue
            if not handle_line(line, pds, reporter):
                break
    except KeyboardInterrupt:
        pass
    finally:
        stop.set()
        watcher.join(1)
        for pd in pds.values():
            pd.stop()
        bus.stop()
        try:
            if os.path.islink(args.link) and os.readlink(args.link) == device:
                os.unlink(args.link)
        except OSError:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
