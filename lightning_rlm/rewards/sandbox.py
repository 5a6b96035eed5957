"""Run untrusted Python (a model's completion) against tests in a resource-limited subprocess.

Each run is a fresh interpreter (``python -s -c <harness>`` with an empty environment: the equivalent of
``python -I``, except that ``PYTHONHASHSEED`` is honoured, so set and dict orders are reproducible) in its own
process group and its own temporary directory. The harness reads the job (code, function name, tests) from
stdin, installs the guards below, ``exec``s the code as ``__main__``, calls the function on each test's
arguments and streams one JSON line per test to a private pipe (not stdout, so printing cannot forge a result;
each line carries a per-run nonce). The parent reads stdout/stderr (at most ``max_output_bytes`` of each kept,
the rest drained and dropped) and the result pipe until the process ends or the wall-clock ``timeout``
passes, then kills the whole process group. A crash, an exception, an infinite loop, a memory blow-up or an
early exit is a scored failure (a status in the :class:`ExecResult`), never an exception in the caller.

Limits (``resource.setrlimit`` in the child before the code runs, soft = hard where raising them would undo
them; by the harness right after start-up, and with ``preexec=True`` also in ``preexec_fn`` before ``exec``):

* ``RLIMIT_AS`` (``memory_mb``): a large allocation raises ``MemoryError`` (status ``memory``);
* ``RLIMIT_CPU`` (``cpu_seconds``): a busy loop gets ``SIGXCPU`` (status ``timeout``), and the wall-clock
  ``timeout`` catches a sleeping or blocked one (``os.killpg(..., SIGKILL)``);
* ``RLIMIT_NPROC`` (processes of the user now + ``max_processes`` per concurrent run): a fork bomb's forks
  fail. Linux does not apply this limit to root; the harness also replaces ``os.fork``, ``os.system``, the
  ``os.spawn*``/``os.exec*``/``posix_spawn`` family and ``_posixsubprocess.fork_exec`` (which ``subprocess``
  and ``multiprocessing`` use) with functions that raise, and ``os.kill``/``os.killpg`` as well;
* ``RLIMIT_FSIZE`` (``max_file_mb``): a larger file write fails (``OSError: File too large``);
* ``RLIMIT_CORE`` 0 and ``RLIMIT_NOFILE`` 256.

No network: before the code runs, ``socket.socket`` (and ``_socket.socket``), ``socket.create_connection``,
``create_server``, ``socketpair``, ``fromfd`` and ``getaddrinfo`` are replaced by functions that raise
``PermissionError``. The working directory is ``<TemporaryDirectory>/work``, so relative writes (also
``../x``) land inside the temporary directory, which is removed after the run.

**This is a resource-limited subprocess, not a security sandbox** (not gVisor, nsjail, firejail or a
container): the guards are Python-level and best effort. Code that means harm can undo them (``ctypes`` can
call ``fork`` or ``connect`` directly, ``importlib.reload(socket)`` restores sockets, a child that calls
``setsid`` leaves the process group, an absolute path writes wherever the user may write, and the result
pipe can be found and written to). It guards a training run against the accidents a policy's code makes
(infinite loops, huge allocations, fork loops, stray files, a slow network call), not against an adversary.
For more isolation run as an unprivileged ``user`` (root may switch to one; the interpreter must be readable
by it) or run the whole training job in a container.

Why the harness and not ``preexec_fn`` by default: a ``preexec_fn`` makes Python ``fork()`` the parent
instead of ``vfork()``, which costs page-table copies of a large training process (a start took 113 ms
instead of 32 ms from a parent holding 1.2 GB of tensors), and it is documented as unsafe in a process with
threads (the pool's): a child could deadlock on a lock another thread held at ``fork`` time (it would then
be killed at the timeout, one failed score). The code runs under the same limits either way.
"""

from __future__ import annotations

import json
import os
import resource
import secrets
import selectors
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Optional, Union

__all__ = ["STATUSES", "ExecResult", "Job", "Sandbox", "TestOutcome"]

# What a run ended as: ran every test ("ok", whether or not they passed), the code or harness failed
# ("error", also an early exit), the wall clock or CPU limit ran out ("timeout"), a MemoryError ("memory"),
# or a signal ended the process ("killed").
STATUSES = ("ok", "error", "timeout", "memory", "killed")
CACHEABLE = ("ok", "error", "memory")  # statuses that do not depend on the machine's load (Sandbox.cache_size)

_RESULT_CAP = 1 << 20  # bytes of per-test records kept
_STDIN_DIRECT = 32768  # a job up to this size is written to the pipe directly (below the pipe buffer)

# The harness the child runs (`python -s -c HARNESS`). Standard library only; it must run on Python >= 3.10.
HARNESS = r'''
import json, math, os, sys


def _err(e):
    try:
        text = f"{type(e).__name__}: {e}"
    except BaseException:
        text = type(e).__name__
    return text[:300]


def _same(got, exp):
    """Strict equality with the expected JSON value: built-in types' own comparisons, so an object with an
    overridden __eq__ (or a subclass of int/str/list/dict that lies) is compared by its real contents."""
    if exp is None:
        return got is None
    if isinstance(exp, bool):
        return isinstance(got, bool) and got is exp
    if isinstance(exp, int):
        return isinstance(got, int) and not isinstance(got, bool) and int.__eq__(got, exp) is True
    if isinstance(exp, float):
        if isinstance(got, bool) or not isinstance(got, (int, float)):
            return False
        value = float.__float__(got) if isinstance(got, float) else float(int.__int__(got))
        return math.isclose(value, exp, rel_tol=1e-6, abs_tol=1e-9)
    if isinstance(exp, str):
        return isinstance(got, str) and str.__eq__(got, exp) is True
    if isinstance(exp, list):
        if isinstance(got, list):
            items = list.__getitem__(got, slice(None))
        elif isinstance(got, tuple):
            items = list(tuple.__getitem__(got, slice(None)))
        else:
            return False
        return len(items) == len(exp) and all(_same(g, e) for g, e in zip(items, exp))
    if isinstance(exp, dict):
        if not isinstance(got, dict) or dict.__len__(got) != len(exp):
            return False
        missing = object()
        return all(_same(dict.get(got, k, missing), v) for k, v in exp.items())
    return False


def _deny(what):
    def denied(*args, **kwargs):
        raise PermissionError(f"{what} is disabled in the sandbox")
    return denied


def _guard():
    import socket, _socket
    class NoSocket:
        def __init__(self, *args, **kwargs):
            raise PermissionError("network access is disabled in the sandbox")
    socket.socket = _socket.socket = NoSocket
    for name in ("create_connection", "create_server", "socketpair", "fromfd", "getaddrinfo"):
        if hasattr(socket, name):
            setattr(socket, name, _deny("network access"))
    for name in ("socketpair", "getaddrinfo"):
        if hasattr(_socket, name):
            setattr(_socket, name, _deny("network access"))
    for name in ("fork", "forkpty", "system", "popen", "posix_spawn", "posix_spawnp", "kill", "killpg",
                 "spawnl", "spawnle", "spawnlp", "spawnlpe", "spawnv", "spawnve", "spawnvp", "spawnvpe",
                 "execl", "execle", "execlp", "execlpe", "execv", "execve", "execvp", "execvpe"):
        if hasattr(os, name):
            setattr(os, name, _deny(f"os.{name}"))
    import _posixsubprocess
    _posixsubprocess.fork_exec = _deny("starting a process")


def _main():
    job = json.loads(sys.stdin.buffer.read().decode("utf-8"))
    fd, nonce = job["fd"], job["nonce"]
    import resource
    for which, soft, hard in job["limits"]:  # before any user code runs; the same as preexec_fn would set
        try:
            resource.setrlimit(which, (soft, hard))
        except (ValueError, OSError):
            pass  # a limit the platform refuses keeps its old value
    out = os.fdopen(fd, "w", buffering=1, encoding="utf-8")  # line-buffered: each record is flushed

    def emit(**rec):
        rec["nonce"] = nonce
        out.write(json.dumps(rec) + "\n")

    _guard()
    namespace = {"__name__": "__main__", "__builtins__": __builtins__}
    try:
        exec(compile(job["code"], "<completion>", "exec"), namespace)
    except MemoryError:
        emit(event="load", ok=False, error="MemoryError", memory=True)
        return 3
    except Exception as e:
        emit(event="load", ok=False, error=_err(e))
        return 2
    fn = namespace.get(job["entry_point"]) if job["entry_point"] else None
    if job["entry_point"] and not callable(fn):
        emit(event="load", ok=False, error=f"no function named {job['entry_point']!r}")
        return 2
    emit(event="load", ok=True)
    all_ok = True
    for i, test in enumerate(job["tests"]):
        rec = {"event": "test", "i": i}
        try:
            got = fn(*test["input"])
        except MemoryError:
            rec.update(ok=False, loose=False, error="MemoryError", memory=True)
        except Exception as e:
            rec.update(ok=False, loose=False, error=_err(e))
        else:
            exp = test["output"]
            try:
                ok = _same(got, exp)
            except Exception:
                ok = False
            try:
                loose = ok or bool(got == exp)
            except Exception:
                loose = False
            try:
                shown = repr(got)[:200]
            except Exception:
                shown = "<unprintable>"
            rec.update(ok=ok, loose=loose, got=shown)
        all_ok = all_ok and rec["ok"]
        emit(**rec)
    emit(event="done")
    return 0 if all_ok else 1


sys.exit(_main())
'''


@dataclass(frozen=True)
class TestOutcome:
    """One test of a run: ``ok`` strict equality, ``loose`` plain ``==`` (or strict), ``ran`` it returned or
    raised before the process ended; ``error`` the exception, ``got`` the returned value's repr (capped)."""

    __test__ = False  # not a pytest test class

    ok: bool = False
    loose: bool = False
    ran: bool = False
    error: Optional[str] = None
    got: Optional[str] = None


@dataclass(frozen=True)
class ExecResult:
    """What one sandboxed run did.

    ``passed``/``total``: tests passed (strict equality) of those given; ``status`` one of :data:`STATUSES`;
    ``stdout``/``stderr``: the first ``max_output_bytes`` of each (decoded); ``seconds``: wall time of the
    run; ``returncode``: the process's exit status (negative: the signal); ``finished``: the harness ran
    every test and reported; ``detail``: why it failed, in a line.
    """

    status: str
    passed: int = 0
    total: int = 0
    tests: tuple[TestOutcome, ...] = ()
    stdout: str = ""
    stderr: str = ""
    seconds: float = 0.0
    returncode: Optional[int] = None
    finished: bool = False
    detail: str = ""

    @property
    def all_passed(self) -> bool:
        return self.total > 0 and self.passed == self.total


@dataclass(frozen=True)
class Job:
    """Code to run, the function to call (None: only run the code) and its tests, each
    ``{"input": [args...], "output": expected}`` (JSON values; a test's arguments are the ``input`` list)."""

    code: str
    entry_point: Optional[str] = None
    tests: tuple[dict, ...] = ()

    def key(self) -> str:
        return json.dumps([self.code, self.entry_point, list(self.tests)], sort_keys=True)


def _user_task_count(uid: int) -> int:
    """Tasks (threads) whose real uid is `uid`: what RLIMIT_NPROC counts."""
    count = 0
    try:
        pids = [p for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status", "rb") as f:
                status = f.read()
        except OSError:
            continue
        uid_line = status.split(b"\nUid:", 1)
        threads_line = status.split(b"\nThreads:", 1)
        if len(uid_line) == 2 and len(threads_line) == 2 and int(uid_line[1].split()[0]) == uid:
            count += int(threads_line[1].split()[0])
    return count


def _killpg(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


@dataclass
class Sandbox:
    """Runs code against tests in a fresh, resource-limited interpreter; :meth:`run_many` over a thread pool.

    Args:
        timeout: wall-clock seconds per run (the process group is killed after it).
        cpu_seconds: CPU seconds per run (RLIMIT_CPU; None: ``timeout`` rounded up).
        memory_mb: address-space limit (RLIMIT_AS) in MiB.
        max_processes: processes a run may add (RLIMIT_NPROC headroom; not enforced for root, see above).
        max_file_mb: largest file a run may write (RLIMIT_FSIZE), in MiB.
        max_output_bytes: bytes of stdout (and of stderr) kept; the rest is read and dropped.
        max_workers: concurrent runs in :meth:`run_many`.
        python: the interpreter (default: this one).
        tmp_root: where the temporary directories are made (default: the system's).
        user: run as this user (name or uid; only when this process may switch users, i.e. root).
        hash_seed: ``PYTHONHASHSEED`` of the child (set/dict-of-str orders reproducible).
        preexec: also set the limits in ``preexec_fn`` (before ``exec``), not only in the harness before the
            code runs. Off by default: ``preexec_fn`` makes Python ``fork()`` instead of ``vfork()`` (a start
            took 113 ms instead of 32 ms from a parent holding 1.2 GB) and is unsafe with threads.
        cache_size: keep the results of this many distinct jobs (least recently used dropped) and answer a
            repeated job from them, across :meth:`run_many` calls. 0 (default): every call runs its jobs. Only
            results that do not depend on the machine's load are kept (``ok``, ``error``, ``memory``; never a
            timeout or a kill), so it assumes the code is deterministic: code that reads the clock or an
            unseeded RNG gets its first result again. Meant for a fixed teacher pool and a student that
            repeats itself, where most of a step's jobs were run before; ``cache_hits`` counts the answers.
    """

    timeout: float = 5.0
    cpu_seconds: Optional[int] = None
    memory_mb: int = 512
    max_processes: int = 16
    max_file_mb: float = 1.0
    max_output_bytes: int = 4096
    max_workers: int = 2
    python: str = field(default_factory=lambda: sys.executable)
    tmp_root: Optional[str] = None
    user: Optional[Union[str, int]] = None
    hash_seed: int = 0
    preexec: bool = False
    cache_size: int = 0

    def __post_init__(self) -> None:
        if self.timeout <= 0:
            raise ValueError(f"timeout must be > 0, got {self.timeout}")
        for name in ("memory_mb", "max_processes", "max_output_bytes", "max_workers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.cache_size < 0:
            raise ValueError(f"cache_size must be >= 0, got {self.cache_size}")
        self._nproc_base: Optional[int] = None
        self._cache: OrderedDict[str, ExecResult] = OrderedDict()
        self.cache_hits = 0

    # ----- one run ----------------------------------------------------------------------------------------
    def run(self, code: str, entry_point: Optional[str] = None, tests: Sequence[dict] = ()) -> ExecResult:
        """Run ``code``, then call ``entry_point`` on each test's ``input`` and compare with its ``output``."""
        return self._run(Job(code, entry_point, tuple(tests)))

    def run_many(self, jobs: Sequence[Job]) -> list[ExecResult]:
        """Results in the order of ``jobs``; identical jobs run once; ``max_workers`` runs at a time."""
        if not jobs:
            return []
        job_keys = [job.key() for job in jobs]
        by_key: dict[str, ExecResult] = {}
        unique: dict[str, Job] = {}
        for job, key in zip(jobs, job_keys):
            if key in self._cache:
                if key not in by_key:
                    self.cache_hits += 1
                    by_key[key] = self._cache[key]
                    self._cache.move_to_end(key)
            else:
                unique.setdefault(key, job)
        keys = list(unique)
        if keys:
            self._nproc_base = _user_task_count(self._uid())
            try:
                if self.max_workers == 1 or len(keys) == 1:
                    results = [self._run(unique[k]) for k in keys]
                else:
                    with ThreadPoolExecutor(max_workers=min(self.max_workers, len(keys))) as pool:
                        results = list(pool.map(self._run, (unique[k] for k in keys)))
            finally:
                self._nproc_base = None
            by_key.update(zip(keys, results))
            if self.cache_size:
                for key, result in zip(keys, results):
                    if result.status in CACHEABLE:
                        self._cache[key] = result
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
        return [by_key[key] for key in job_keys]

    # ----- the child --------------------------------------------------------------------------------------
    def _uid(self) -> int:
        if self.user is None:
            return os.getuid()
        if isinstance(self.user, int):
            return self.user
        import pwd

        return pwd.getpwnam(self.user).pw_uid

    def _cpu_limit(self) -> int:
        return self.cpu_seconds if self.cpu_seconds is not None else max(1, int(-(-self.timeout // 1)))

    def _limits(self) -> dict[int, tuple[int, int]]:
        cpu = self._cpu_limit()
        base = self._nproc_base if self._nproc_base is not None else _user_task_count(self._uid())
        nproc = base + self.max_processes * (self.max_workers + 1)
        memory = self.memory_mb * 2**20
        fsize = max(1, int(self.max_file_mb * 2**20))
        return {
            resource.RLIMIT_AS: (memory, memory),
            resource.RLIMIT_CPU: (cpu, cpu + 1),
            resource.RLIMIT_NPROC: (nproc, nproc),
            resource.RLIMIT_FSIZE: (fsize, fsize),
            resource.RLIMIT_CORE: (0, 0),
            resource.RLIMIT_NOFILE: (256, 256),
        }

    def _env(self, cwd: str) -> dict[str, str]:
        return {"PATH": "/usr/bin:/bin", "HOME": cwd, "TMPDIR": cwd, "LANG": "C.UTF-8",
                "PYTHONHASHSEED": str(self.hash_seed), "PYTHONNOUSERSITE": "1", "PYTHONSAFEPATH": "1",
                "PYTHONDONTWRITEBYTECODE": "1", "PYTHONIOENCODING": "utf-8"}

    def _run(self, job: Job) -> ExecResult:
        start = time.monotonic()
        total = len(job.tests) if job.entry_point else 0
        limits = self._limits()

        def preexec() -> None:  # in the forked child, before exec: only setrlimit calls
            for which, value in limits.items():
                try:
                    resource.setrlimit(which, value)
                except (ValueError, OSError):
                    pass  # a limit the platform refuses (e.g. above the hard limit) keeps its old value

        nonce = secrets.token_hex(8)
        with tempfile.TemporaryDirectory(prefix="lrlm-sandbox-", dir=self.tmp_root) as root:
            cwd = os.path.join(root, "work")
            os.mkdir(cwd)
            user_kwargs: dict[str, Any] = {}
            if self.user is not None:
                uid = self._uid()
                import pwd

                gid = pwd.getpwuid(uid).pw_gid
                os.chown(root, uid, gid)
                os.chown(cwd, uid, gid)
                user_kwargs = {"user": uid, "group": gid, "extra_groups": []}
            read_fd, write_fd = os.pipe()
            try:
                proc = subprocess.Popen(
                    [self.python, "-s", "-c", HARNESS], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE, cwd=cwd, env=self._env(cwd), pass_fds=(write_fd,),
                    start_new_session=True, preexec_fn=preexec if self.preexec else None, **user_kwargs)
            except OSError as e:
                os.close(read_fd)
                return ExecResult("error", total=total, seconds=time.monotonic() - start,
                                  detail=f"could not start {self.python}: {e}")
            finally:
                os.close(write_fd)
            try:
                payload = json.dumps({"code": job.code, "entry_point": job.entry_point,
                                      "tests": list(job.tests) if job.entry_point else [],
                                      "fd": write_fd, "nonce": nonce,
                                      "limits": [[w, *v] for w, v in limits.items()]}).encode()
                self._feed(proc, payload)
                out, err, res, timed_out = self._collect(proc, read_fd, start + self.timeout)
                try:
                    proc.wait(timeout=0 if timed_out else max(0.0, start + self.timeout - time.monotonic()))
                except subprocess.TimeoutExpired:
                    timed_out = True
                _killpg(proc.pid)  # the whole group: a timed-out run and anything it left running
                returncode = proc.wait()
            finally:
                os.close(read_fd)
                for pipe in (proc.stdin, proc.stdout, proc.stderr):
                    if pipe is not None:
                        try:
                            pipe.close()
                        except OSError:
                            pass
        seconds = time.monotonic() - start
        return self._result(job, total, nonce, out, err, res, timed_out, returncode, seconds)

    @staticmethod
    def _feed(proc: subprocess.Popen, payload: bytes) -> None:
        def write() -> None:
            try:
                proc.stdin.write(payload)
                proc.stdin.close()
            except (BrokenPipeError, OSError, ValueError):
                pass  # the child died before reading its job: its status says why

        if len(payload) <= _STDIN_DIRECT:
            write()
        else:
            threading.Thread(target=write, daemon=True).start()

    def _collect(self, proc: subprocess.Popen, result_fd: int,
                 deadline: float) -> tuple[bytes, bytes, bytes, bool]:
        """Read stdout, stderr and the result pipe (each up to its cap, the rest dropped) until all three
        close, the deadline passes, or the process has exited and a leftover child still holds a pipe."""
        caps = {proc.stdout.fileno(): self.max_output_bytes, proc.stderr.fileno(): self.max_output_bytes,
                result_fd: _RESULT_CAP}
        bufs = {fd: bytearray() for fd in caps}
        sel = selectors.DefaultSelector()
        for fd in caps:
            sel.register(fd, selectors.EVENT_READ)
        timed_out, exited_at = False, None
        try:
            while sel.get_map():
                now = time.monotonic()
                if now >= deadline:
                    timed_out = True
                    break
                if exited_at is None and proc.poll() is not None:
                    exited_at = now
                if exited_at is not None and now - exited_at > 0.2:
                    break  # the process is gone; a process it started keeps a pipe open
                for key, _ in sel.select(timeout=min(deadline - now, 0.1)):
                    fd = key.fd
                    try:
                        chunk = os.read(fd, 65536)
                    except OSError:
                        chunk = b""
                    if not chunk:
                        sel.unregister(fd)
                        continue
                    room = caps[fd] - len(bufs[fd])
                    if room > 0:
                        bufs[fd] += chunk[:room]
        finally:
            sel.close()
        return (bytes(bufs[proc.stdout.fileno()]), bytes(bufs[proc.stderr.fileno()]), bytes(bufs[result_fd]),
                timed_out)

    def _result(self, job: Job, total: int, nonce: str, out: bytes, err: bytes, res: bytes, timed_out: bool,
                returncode: int, seconds: float) -> ExecResult:
        records = []
        for line in res.decode("utf-8", "replace").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict) and rec.get("nonce") == nonce:
                records.append(rec)
        load = next((r for r in records if r.get("event") == "load"), None)
        finished = any(r.get("event") == "done" for r in records)
        outcomes = [TestOutcome() for _ in range(total)]
        for r in records:
            if r.get("event") == "test" and isinstance(r.get("i"), int) and 0 <= r["i"] < total:
                outcomes[r["i"]] = TestOutcome(ok=bool(r.get("ok")), loose=bool(r.get("loose")), ran=True,
                                               error=r.get("error"), got=r.get("got"))
        stderr = err.decode("utf-8", "replace")
        memory = any(r.get("memory") for r in records) or "MemoryError" in stderr
        xcpu = returncode == -signal.SIGXCPU
        if timed_out or xcpu:
            status = "timeout"
            detail = (f"CPU limit ({self._cpu_limit()} s)" if xcpu and not timed_out
                      else f"wall-clock limit ({self.timeout:g} s)")
        elif memory:
            status, detail = "memory", f"MemoryError (limit {self.memory_mb} MiB)"
        elif returncode < 0:
            status, detail = "killed", f"killed by {signal.Signals(-returncode).name}"
        elif finished:
            status, detail = "ok", ""
        else:
            status = "error"
            if load is not None and not load.get("ok"):
                detail = str(load.get("error"))
            elif load is None and returncode != 0 and stderr.strip():
                detail = stderr.strip().splitlines()[-1][:300]
            else:
                detail = f"exited with status {returncode} before the tests finished"
        return ExecResult(status=status, passed=sum(o.ok for o in outcomes), total=total, tests=tuple(outcomes),
                          stdout=out.decode("utf-8", "replace"), stderr=stderr, seconds=seconds,
                          returncode=returncode, finished=finished, detail=detail)
