"""E2B's official Python SDK (PyPI `e2b`, pinned by .ci/run, unmodified) against agentd.

Configured only by environment variables, as a user would: E2B_API_URL, E2B_SANDBOX_URL,
E2B_API_KEY; plus AGENTD_HOST_PORT (agentd's TCP address, for the sandbox origin that
`get_host` names: the test has no wildcard DNS) and PROBE (the probe binary, uploaded with
the SDK and run as a web server inside). Every call tried is printed, with its result, as one
JSON document at the end; the first failed check ends the run with status 1.
"""

import json
import os
import sys
import time
import urllib.request
import uuid

from e2b import CommandExitException, NotFoundException, Sandbox, SandboxQuery, SandboxState
from e2b.sandbox.commands.command_handle import PtySize

TRIED = []


def check(call, ok, detail=""):
    TRIED.append({"call": call, "ok": bool(ok), "detail": str(detail)[:300]})
    if not ok:
        print(json.dumps(TRIED, indent=1))
        sys.exit(1)


def main():
    suite = "py-" + uuid.uuid4().hex[:8]
    t = time.time()
    sbx = Sandbox.create(
        template="opencode", timeout=120, metadata={"suite": suite}, envs={"FOO": "bar"}
    )
    check("Sandbox.create", sbx.sandbox_id, f"{sbx.sandbox_id} in {time.time() - t:.2f} s")
    check("Sandbox.is_running", sbx.is_running())

    # A command: streamed output, exit code.
    out, err = [], []
    r = sbx.commands.run(
        "echo $FOO; for i in 1 2 3; do echo line $i; done; echo to-err >&2",
        on_stdout=out.append,
        on_stderr=err.append,
    )
    check(
        "commands.run (streamed stdout/stderr)",
        r.exit_code == 0
        and r.stdout == "bar\nline 1\nline 2\nline 3\n"
        and r.stderr == "to-err\n"
        and "".join(out) == r.stdout
        and "".join(err) == r.stderr,
        repr((r.stdout, r.stderr, out, err)),
    )
    try:
        sbx.commands.run("echo before; exit 3")
        check("commands.run (exit 3 raises)", False, "no exception")
    except CommandExitException as e:
        check("commands.run (exit 3 raises)", e.exit_code == 3 and e.stdout == "before\n", e)
    r = sbx.commands.run("id -un; pwd", user="root", cwd="/etc")
    check("commands.run (user root, cwd)", r.stdout == "root\n/etc\n", repr(r.stdout))

    # A background command, listed, then killed.
    h = sbx.commands.run("sleep 300", background=True)
    listed = [p.pid for p in sbx.commands.list()]
    check("commands.run (background) + commands.list", h.pid in listed, listed)
    check("commands.kill", sbx.commands.kill(h.pid) is True)
    try:
        h.wait()
        check("CommandHandle.wait (killed)", False, "no exception")
    except CommandExitException as e:
        check("CommandHandle.wait (killed)", e.exit_code != 0, e.exit_code)
    check("commands.list (after kill)", h.pid not in [p.pid for p in sbx.commands.list()])
    check("commands.kill (unknown pid)", sbx.commands.kill(999_999) is False)

    # stdin.
    h = sbx.commands.run("cat; echo done", background=True, stdin=True)
    sbx.commands.send_stdin(h.pid, "ping\n")
    sbx.commands.close_stdin(h.pid)
    r = h.wait()
    check("commands.send_stdin + close_stdin", r.stdout == "ping\ndone\n", repr(r.stdout))
    h = sbx.commands.run("cat; echo end", background=True, stdin=True)
    sbx.commands.stream_input(h.pid, iter(["a\n", b"b\n", "c\n"]))
    sbx.commands.close_stdin(h.pid)
    r = h.wait()
    check("commands.stream_input (client stream)", r.stdout == "a\nb\nc\nend\n", repr(r.stdout))

    # A terminal.
    seen = bytearray()
    p = sbx.pty.create(PtySize(rows=24, cols=80), timeout=30)
    sbx.pty.send_stdin(p.pid, b"stty size; tty; exit 4\n")
    try:
        p.wait(on_pty=seen.extend)
        code = 0
    except CommandExitException as e:
        code = e.exit_code
    text = seen.decode(errors="replace")
    check(
        "pty.create + send_stdin + wait(on_pty)",
        "24 80" in text and "/dev/pts/" in text and code == 4,
        repr((code, text[-200:])),
    )

    # Files.
    sbx.files.write("/tmp/e2b/dir/a.txt", "hello file")
    check("files.write + read (/tmp, new dirs)", sbx.files.read("/tmp/e2b/dir/a.txt") == "hello file")
    blob = bytes(range(256)) * 64
    sbx.files.write("/home/agent/blob.bin", blob, use_octet_stream=True)
    check(
        "files.write (octet-stream) + read bytes",
        bytes(sbx.files.read("/home/agent/blob.bin", format="bytes")) == blob,
    )
    names = sorted(e.name for e in sbx.files.list("/tmp/e2b/dir"))
    check("files.list", names == ["a.txt"], names)
    info = sbx.files.get_info("/home/agent/blob.bin")
    check("files.get_info", info.size == len(blob) and info.type.value == "file", info)
    check("files.exists", sbx.files.exists("/tmp/e2b/dir/a.txt") and not sbx.files.exists("/nope"))
    check("files.make_dir", sbx.files.make_dir("/home/agent/newdir") is True)
    check("files.make_dir (exists)", sbx.files.make_dir("/home/agent/newdir") is False)
    moved = sbx.files.rename("/tmp/e2b/dir/a.txt", "/home/agent/newdir/b.txt")
    check("files.rename", moved.path == "/home/agent/newdir/b.txt", moved)
    r = sbx.commands.run("stat -c '%U %s' /home/agent/newdir/b.txt /home/agent/blob.bin")
    check("files are the user's", r.stdout == "agent 10\nagent 16384\n", repr(r.stdout))
    sbx.files.remove("/home/agent/newdir")
    check("files.remove", not sbx.files.exists("/home/agent/newdir"))
    try:
        sbx.files.read("/home/agent/missing.txt")
        check("files.read (missing)", False, "no exception")
    except NotFoundException as e:
        check("files.read (missing) raises NotFound", True, e)

    # A watched directory.
    sbx.files.make_dir("/tmp/watched")
    w = sbx.files.watch_dir("/tmp/watched")
    sbx.files.write("/tmp/watched/new.txt", "x")
    sbx.commands.run("rm /tmp/watched/new.txt")
    time.sleep(1)
    events = [(e.type.value, e.name) for e in w.get_new_events()]
    w.stop()
    check(
        "files.watch_dir",
        ("create", "new.txt") in events and ("remove", "new.txt") in events,
        events,
    )

    # get_host: a web server inside, reached through agentd's origin for that port (the
    # SDK's host name with the request sent to agentd's address; no wildcard DNS here).
    probe = open(os.environ["PROBE"], "rb").read()
    sbx.files.write("/home/agent/probe", probe, use_octet_stream=True)
    sbx.commands.run("chmod +x /home/agent/probe")
    sbx.commands.run("/home/agent/probe http 8000", background=True)
    host = sbx.get_host(8000)
    check("get_host", host.startswith(f"8000-{sbx.sandbox_id}."), host)
    body = ""
    for _ in range(50):
        req = urllib.request.Request(
            f"http://{os.environ['AGENTD_HOST_PORT']}/",
            headers={"Host": host, "e2b-traffic-access-token": sbx.traffic_access_token or ""},
        )
        try:
            body = urllib.request.urlopen(req, timeout=5).read().decode()
            break
        except Exception as e:  # not listening yet
            body = str(e)
            time.sleep(0.2)
    check("get_host (HTTP server inside)", "hello from port 8000" in body, body)
    req = urllib.request.Request(f"http://{os.environ['AGENTD_HOST_PORT']}/", headers={"Host": host})
    try:
        urllib.request.urlopen(req, timeout=5)
        check("get_host without the traffic token", False, "answered")
    except urllib.error.HTTPError as e:
        check("get_host without the traffic token is refused", e.code == 401, e.code)

    # envd by host name, where wildcard DNS exists: 49983-{id}.{domain} (the SDK's own host).
    envd_host = sbx.get_host(49983)
    req = urllib.request.Request(
        f"http://{os.environ['AGENTD_HOST_PORT']}/health",
        headers={"Host": envd_host, "X-Access-Token": sbx._envd_access_token or ""},
    )
    status = urllib.request.urlopen(req, timeout=5).status
    check("envd by host (49983-{id}.{domain}) /health", status == 204, (envd_host, status))
    req = urllib.request.Request(f"http://{os.environ['AGENTD_HOST_PORT']}/health", headers={"Host": envd_host})
    try:
        urllib.request.urlopen(req, timeout=5)
        check("envd by host without the access token", False, "answered")
    except urllib.error.HTTPError as e:
        check("envd by host without the access token is refused", e.code == 401, e.code)

    # fork: agentd's fork (the files of the moment; a sandbox of its own from there).
    sbx.files.write("/home/agent/before-fork.txt", "parent")
    forks = sbx.fork(count=1, timeout=60)
    check("Sandbox.fork", len(forks) == 1 and not isinstance(forks[0], Exception), forks)
    child = forks[0]
    check(
        "Sandbox.fork (the fork sees the parent's files)",
        child.files.read("/home/agent/before-fork.txt") == "parent" and child.sandbox_id != sbx.sandbox_id,
        child.sandbox_id,
    )
    child.files.write("/home/agent/only-fork.txt", "x")
    check("Sandbox.fork (they diverge)", not sbx.files.exists("/home/agent/only-fork.txt"))
    child.kill()

    # Listing by metadata, info, timeout, pause and resume (connect), kill.
    other = Sandbox.create(template="opencode", timeout=120, metadata={"suite": suite + "-other"})
    found = [s.sandbox_id for s in Sandbox.list(query=SandboxQuery(metadata={"suite": suite})).next_items()]
    check("Sandbox.list (metadata)", found == [sbx.sandbox_id], found)
    got = sbx.get_info()
    check("Sandbox.get_info", got.metadata == {"suite": suite} and got.sandbox_id == sbx.sandbox_id, got)
    sbx.pause()
    paused = [s.sandbox_id for s in Sandbox.list(query=SandboxQuery(metadata={"suite": suite}, state=[SandboxState.PAUSED])).next_items()]
    check("Sandbox.pause", paused == [sbx.sandbox_id], paused)
    again = Sandbox.connect(sbx.sandbox_id)
    r = again.commands.run("cat /home/agent/blob.bin | wc -c")
    check("Sandbox.connect (resumes)", r.stdout.strip() == "16384", repr(r.stdout))
    other.set_timeout(3)
    time.sleep(6)
    check("set_timeout (expired)", not other.is_running())
    check("Sandbox.kill", Sandbox.kill(sbx.sandbox_id) is True)
    try:
        Sandbox.get_info(sbx.sandbox_id)
        check("Sandbox.get_info (killed)", False, "found")
    except NotFoundException:
        check("Sandbox.get_info (killed) raises NotFound", True)
    print(json.dumps(TRIED, indent=1))


main()
