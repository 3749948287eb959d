"""The service mode of the runner protocol: a long-lived sandbox that serves requests.

Inspect AI's sandbox provider (`eval_actors.inspect_sandbox`) starts the harness with `--service`.
The channel is the same as a shard's (JSON lines on stdin/stdout, `v`, outbound `seq`,
the `harness ready` log first), but the conversation differs:

Into the sandbox: first `service` (the defaults of the sandbox: its user, working folder
and environment), then any number of requests, each with an `id` of the caller's:

| type         | fields                                                                    |
|--------------|---------------------------------------------------------------------------|
| `exec`       | `argv`, `cwd`, `env`, `user`, `timeout_s`, `output_limit`, `input` (stdin follows as `data`) |
| `read_file`  | `path`, `limit` (bytes; larger files are refused, `too_large`)             |
| `write_file` | `path` (its content follows as `data`)                                    |
| `data`       | `id`, a piece of a request's stdin or content (base64), `eof` on the last  |
| `cancel`     | the sandbox is closing                                                     |

Out of it: `chunk` (`id`, `stream` stdout/stderr/file, base64 `data`) and one `result`
per request (`ok`, `returncode`, `timed_out`, `error` kind, `message`, byte counts).

Each request runs once and only once: a repeated `id` is answered with the result kept
for it (the most recent `REPLAYED` results; older ones with a `duplicate` error), never
run again. Every line stays under the protocol's `MAX_LINE_BYTES`: content travels in
pieces of `PIECE_BYTES`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import Field, TypeAdapter, ValidationError

from proctor.protocol import LogEvent, _Msg, _Out

PIECE_BYTES = 512 * 1024  # raw bytes of one `data` or `chunk` line (base64: ~700 KB, under MAX_LINE_BYTES)
MAX_EXEC_OUTPUT = 64 * 1024**2  # the most an exec may ask to get back per stream
MAX_WRITE_BYTES = 1024**3  # the largest file write_file takes
REPLAYED = 16
_ID = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:-]+$")
_B64 = Field("", max_length=(PIECE_BYTES + 2) // 3 * 4)

ErrorKind = Literal["not_found", "permission", "is_a_directory", "too_large", "unknown_user", "bad_request",
                    "duplicate", "failed"]


# ---------------------------------------------------------------- into the sandbox


class ServiceStart(_Msg):
    """The first message: what every request runs with unless it says otherwise."""

    type: Literal["service"] = "service"
    user: str = Field("nobody", description="a user of the sandbox: a name, 'uid' or 'uid:gid'")
    cwd: str = Field("/workspace", description="the working folder (absolute); relative paths start here")
    env: dict[str, str] = Field(default_factory=dict)


class ExecRequest(_Msg):
    type: Literal["exec"] = "exec"
    id: str = _ID
    argv: list[str] = Field(min_length=1, max_length=4096)
    cwd: str | None = None
    env: dict[str, str] = Field(default_factory=dict)
    user: str | None = None
    timeout_s: float | None = Field(None, gt=0)
    output_limit: int = Field(10 * 1024**2, ge=0, le=MAX_EXEC_OUTPUT)
    input: bool = Field(False, description="stdin follows in `data` messages, to an `eof`")


class ReadFileRequest(_Msg):
    type: Literal["read_file"] = "read_file"
    id: str = _ID
    path: str = Field(min_length=1, max_length=4096)
    limit: int = Field(100 * 1024**2, ge=0)


class WriteFileRequest(_Msg):
    type: Literal["write_file"] = "write_file"
    id: str = _ID
    path: str = Field(min_length=1, max_length=4096)


class DataPiece(_Msg):
    type: Literal["data"] = "data"
    id: str = _ID
    data: str = _B64
    eof: bool = False


class ServiceCancel(_Msg):
    type: Literal["cancel"] = "cancel"
    reason: str = "closed"


ServiceIn = Annotated[Union[ServiceStart, ExecRequest, ReadFileRequest, WriteFileRequest, DataPiece, ServiceCancel],
                      Field(discriminator="type")]
ServiceMessage = Union[ServiceStart, ExecRequest, ReadFileRequest, WriteFileRequest, DataPiece, ServiceCancel]
_in_adapter: TypeAdapter[ServiceMessage] = TypeAdapter(ServiceIn)


def decode_service(line: bytes | str) -> ServiceMessage:
    """Parse a message to a serving harness. Raises `ValueError` naming what is wrong."""
    try:
        return _in_adapter.validate_json(line)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"][1:])
        raise ValueError(f"bad request to the harness: {where}: {err['msg']}") from None


# ---------------------------------------------------------------- out of the sandbox


class ChunkEvent(_Out):
    type: Literal["chunk"] = "chunk"
    id: str = _ID
    stream: Literal["stdout", "stderr", "file"]
    data: str = _B64


class ResultEvent(_Out):
    type: Literal["result"] = "result"
    id: str = _ID
    ok: bool
    returncode: int | None = Field(None, ge=-(2**31), le=2**31 - 1)
    timed_out: bool = False
    error: ErrorKind | None = None
    message: str = Field("", max_length=16 * 1024)
    stdout_bytes: int = Field(0, ge=0, description="bytes the command wrote to stdout in all (sent: up to its limit)")
    stderr_bytes: int = Field(0, ge=0)
    size: int = Field(0, ge=0, description="read_file: the file's size; write_file: bytes written")


ServiceOut = Annotated[Union[LogEvent, ChunkEvent, ResultEvent], Field(discriminator="type")]
SERVICE_OUT_TYPES = ("log", "chunk", "result")
# validates to a ServiceOut; Any as it stands in for the parser's `_out_adapter` (`EventParser.adapter`)
service_out_adapter: TypeAdapter[Any] = TypeAdapter(ServiceOut)


class RequestFailed(Exception):
    """A request the harness refused or could not carry out; `kind` says why. Raised in
    the harness, turned into a `result` with `ok: false`."""

    def __init__(self, kind: ErrorKind, message: str):
        super().__init__(message)
        self.kind = kind


__all__ = ["ServiceStart", "ExecRequest", "ReadFileRequest", "WriteFileRequest", "DataPiece", "ServiceCancel",
           "ChunkEvent", "ResultEvent", "RequestFailed", "decode_service", "PIECE_BYTES", "SERVICE_OUT_TYPES",
           "service_out_adapter"]
