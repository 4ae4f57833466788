"""Issue 20 (hostile input, round two), the receiver's side, each finding in real processes.

- A ~200 KB pickle nesting 200,000 TUPLE1 made the C unpickler hash a tuple
  200,000 deep (SIGSEGV, exit 139) in the receiver, ``monitor`` and
  ``proxy -v`` (all three use `wire.decode_message`): decoded here in a
  child process, so a crash is a failed test, not a dead pytest worker.
- The receiver killed outside systemd left its uploader running, holding
  ``uploader.lock``: the next receiver's uploaders exited "locked" in turn.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

from tests.support.daemon import make_sidecar
from tiled_writer_sidecar.testing import TiledContainer, ZmqProxy, wait_until

#: Decodes the frames the parent writes (length-prefixed) and prints each rejection's reason.
_DECODE_EACH = textwrap.dedent(
    """
    import sys
    from tiled_writer_sidecar.errors import DecodeError
    from tiled_writer_sidecar.wire import decode_message
    data = sys.stdin.buffer.read()
    while data:
        size = int.from_bytes(data[:4], "little")
        frame, data = data[4 : 4 + size], data[4 + size :]
        try:
            decode_message([frame])
            print("accepted", flush=True)
        except DecodeError as error:
            print(error.reason, error.detail, flush=True)
    """
)


def decode_in_a_child(frames: list[bytes]) -> tuple[int, list[str]]:
    data = b"".join(len(frame).to_bytes(4, "little") + frame for frame in frames)
    done = subprocess.run(
        [sys.executable, "-c", _DECODE_EACH], input=data, capture_output=True, timeout=300, check=False
    )
    return done.returncode, done.stdout.decode().splitlines()


def test_the_nested_tuple_pickles_that_crashed_the_decoder_are_too_complex() -> None:
    """The issue's repro (dict key of 200,000 TUPLE1) and its dtype-state variant (the dtype cache
    hashed the sender's state): the decoding process lives on and refuses both, by the scan."""
    state8 = b"(K\x03X\x01\x00\x00\x00<NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffN"
    frames = [
        b"x start \x80\x02}N" + b"\x85" * 200_000 + b"Ns.",
        b"x start \x80\x02cnumpy\ndtype\nX\x02\x00\x00\x00f8\x89\x88\x87R"
        + state8
        + b"N"
        + b"\x85" * 200_000
        + b"tb}X\x01\x00\x00\x00k(ds.",
        b"x start \x80\x04}N" + b"\x85\x94" * 200_000 + b"Ns.",
        b"x start \x80\x02}" + b"(" * 200_000 + b"N" + b"t" * 200_000 + b"Ns.",
    ]
    code, lines = decode_in_a_child(frames)
    assert code == 0, (code, lines)
    assert lines == ["too-complex pickle nests deeper than 200"] * len(frames), lines


def _gone(pid: int) -> bool:
    """Exited: no such process, or a zombie nobody reaped yet."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (FileNotFoundError, ProcessLookupError):
        return True


def _uploader_of(receiver: int) -> int:
    children = Path(f"/proc/{receiver}/task/{receiver}/children").read_text().split()
    assert len(children) == 1, children
    return int(children[0])


def test_the_uploader_dies_with_a_killed_receiver_and_the_next_receiver_runs_its_own(
    tiled_container: TiledContainer, proxy: ZmqProxy, tmp_path: Path
) -> None:
    """SIGKILL of the receiver alone: its uploader exits within seconds (the kernel's parent-death
    signal), so the restarted receiver's uploader takes ``uploader.lock`` and reaches Tiled."""
    sidecar = make_sidecar(tmp_path, proxy, tiled_container)
    lock = sidecar.spool_dir / "uploader.lock"
    with sidecar:
        receiver = sidecar.process.pid
        assert receiver is not None
        orphan = _uploader_of(receiver)
        wait_until(lambda: lock.exists() and lock.read_text().strip() == str(orphan), 120, what="a lock")
        os.kill(receiver, signal.SIGKILL)
        wait_until(lambda: sidecar.process.returncode is not None, 30, what="the receiver reaped")
        wait_until(lambda: _gone(orphan), 30, what=f"the orphaned uploader {orphan} to exit")
        sidecar.start()
        new_receiver = sidecar.process.pid
        assert new_receiver is not None
        uploader = _uploader_of(new_receiver)
        wait_until(lambda: lock.read_text().strip() == str(uploader), 120, what="the new uploader's lock")
        assert not _gone(uploader) and "already running" not in sidecar.log_tail(400)
