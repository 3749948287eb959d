"""Transcripts on storage: Inspect AI `.eval` logs beside the Parquet rows.

Layout under the results root (`file://…` or `s3://…`; folders starting with `_` are not
data to Parquet readers), in Inspect's own layout of shard logs and their merged log:

    eval_id=<id>/_transcripts/<id>.shards/<shard>/a<attempt>.eval   each shard attempt's, when it ends
    eval_id=<id>/_transcripts/<id>.eval       the evaluation's: its shards' latest logs merged when it ends
    _quarantine/eval_id=<id>/<shard>/transcript.eval                a safety-stopped shard's

`inspect view --log-dir <root>` lists every evaluation's log (and hides shard logs that a
finished merged log covers); Inspect's `read_eval_log`, `read_eval_log_sample` and the
`inspect_ai.analysis` data frames read them. A Parquet row's `transcript` column names the
log that holds its sample, relative to the root (`transcript_ref`): the evaluation's log,
or the quarantined shard's. While an evaluation runs, its ended shards' samples are in the
shard logs; the merge at its end replaces them.

Reading (`read`, `listing`, `search`) needs no Inspect import: a sample is one member of
the log's zip (`samples/<id>_epoch_<epoch>.json`), read with ranged reads on S3.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
import zipfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import pyarrow.fs as pafs

from proctor.settings import Settings
from proctor.transcript import (SampleTranscript, TranscriptInfo, TranscriptMatch, TranscriptSearch, Where,
                                excerpt)

from .inspect_log import eval_log, eval_sample, model_name, sample_summary, transcript_of
from .results import mean_ci
from .storage import StorageError, delete, filesystem, is_s3, join, list_files, retried, storage_errors

TRANSCRIPTS = "_transcripts"
SHARD_LOG_RE = re.compile(r"/(?P<shard>[^/]+)/a(?P<attempt>\d+)\.eval$")
MAX_SAMPLE_JSON = 256 * 1024**2  # one stored sample's JSON, at most (its bound is 64 MiB of entries)
MAX_HEADER_JSON = 64 * 1024**2


def transcript_ref(eval_id: str, shard_id: str, quarantined: bool) -> str:
    """Where a sample's transcript is kept, relative to the results root (a row's
    `transcript` column)."""
    if quarantined:
        return f"_quarantine/eval_id={eval_id}/{shard_id}/transcript.eval"
    return f"eval_id={eval_id}/{TRANSCRIPTS}/{eval_id}.eval"


def member(sample_id: str, epoch: int) -> str:
    """A sample's member in a `.eval` zip (as Inspect names it)."""
    return f"samples/{sample_id}_epoch_{epoch}.json"


@dataclass(frozen=True)
class LogFile:
    uri: str
    where: Where
    shard_id: str | None = None  # None for the evaluation's merged log


class TranscriptStore:
    """Writes and reads the transcripts under one results root."""

    def __init__(self, root_uri: str, settings: Settings):
        self.root_uri = root_uri.rstrip("/")
        self.settings = settings

    def uri(self, ref: str) -> str:
        return join(self.root_uri, ref)

    def eval_log_uri(self, eval_id: str) -> str:
        return self.uri(transcript_ref(eval_id, "", False))

    def shards_uri(self, eval_id: str) -> str:
        return self.uri(f"eval_id={eval_id}/{TRANSCRIPTS}/{eval_id}.shards")

    def shard_log_uri(self, eval_id: str, shard_id: str, attempt: int) -> str:
        return join(self.shards_uri(eval_id), shard_id, f"a{attempt}.eval")

    # ------------------------------------------------------------ writing

    def write_shard(self, *, eval_id: str, spec: Any, shard_id: str, attempt: int, status: str,
                    error: str | None, transcripts: Sequence[SampleTranscript], records: Sequence[Any],
                    quarantined: bool) -> str:
        """Write one shard attempt's log (to quarantine for a safety-stopped shard).
        Returns its URI. Raises `StorageError`."""
        model = model_name(spec)
        rows = {(r.sample_id, r.epoch): r for r in records}
        samples = [eval_sample(t, rows.get((t.sample_id, t.epoch)), model) for t in transcripts]
        names = spec.scorer_names()
        metrics = {n: mean_ci([r.scores.get(n, 0.0) for r in records]) for n in names} if records else {}
        stamps = [r.started_at for r in records if r.started_at] + [r.completed_at for r in records if r.completed_at]
        usage = {"input_tokens": sum(r.input_tokens for r in records),
                 "output_tokens": sum(r.output_tokens for r in records)}
        log = eval_log(eval_id=eval_id, name=spec.name, model=model, created=min(stamps, default=0.0) or _now(),
                       samples=None, status=status, started=min(stamps, default=None),
                       completed=max(stamps, default=None), metrics=metrics, total_samples=len(transcripts),
                       completed_samples=sum(1 for r in records if not r.error), dataset=_dataset_name(spec),
                       epochs=spec.epochs, metadata={"eval_id": eval_id, "shard_id": shard_id, "attempt": attempt,
                                                      "labels": dict(spec.labels)},
                       error=error, usage=usage)
        uri = self.uri(transcript_ref(eval_id, shard_id, True)) if quarantined else \
            self.shard_log_uri(eval_id, shard_id, attempt)
        _publish(uri, self.settings, lambda path: _write_log(path, log, samples))
        return uri

    def merge(self, eval_id: str, summary: dict[str, Any]) -> str | None:
        """Merge the latest log of each shard into the evaluation's log, then delete the
        shard logs. Idempotent; None when no shard wrote one. Raises `StorageError`."""
        shards = self.shard_logs(eval_id)
        if not shards:
            return None
        uri = self.eval_log_uri(eval_id)

        def write(path: str) -> None:
            _merge(shards, path, self.settings, eval_id, summary)

        _publish(uri, self.settings, write)
        delete(self.shards_uri(eval_id), self.settings)
        return uri

    # ------------------------------------------------------------ reading

    def shard_logs(self, eval_id: str) -> list[LogFile]:
        """The latest log of each shard that wrote one (not yet merged), by shard id."""
        latest: dict[str, tuple[int, str]] = {}
        for f in list_files(self.shards_uri(eval_id), self.settings):
            m = SHARD_LOG_RE.search(f.uri)
            if m and int(m["attempt"]) >= latest.get(m["shard"], (-1, ""))[0]:
                latest[m["shard"]] = (int(m["attempt"]), f.uri)
        return [LogFile(uri, "stored", shard) for shard, (_, uri) in sorted(latest.items())]

    def logs(self, eval_id: str, quarantine: bool) -> list[LogFile]:
        """The logs holding the evaluation's transcripts now: its merged log, else its shard
        logs; and the quarantined shards' logs when `quarantine`."""
        found = [LogFile(self.eval_log_uri(eval_id), "stored")] if _exists(self.eval_log_uri(eval_id),
                                                                              self.settings) else []
        found = found or self.shard_logs(eval_id)
        if quarantine:
            base = self.uri(f"_quarantine/eval_id={eval_id}")
            found += [LogFile(f.uri, "quarantine", f.uri[len(base) + 1:].split("/")[0])
                      for f in list_files(base, self.settings) if f.uri.endswith("/transcript.eval")]
        return found

    def quarantined(self, eval_id: str, sample_id: str, epoch: int) -> bool:
        """Whether the sample's transcript is in quarantine."""
        return any(self._has(log, sample_id, epoch) for log in self.logs(eval_id, True) if log.where == "quarantine")

    def read(self, eval_id: str, sample_id: str, epoch: int, quarantine: bool) -> tuple[SampleTranscript, Where] | None:
        """A stored sample's transcript and where it was found; quarantined ones only with
        `quarantine`. None when it has none. Raises `StorageError`."""
        for log in self.logs(eval_id, quarantine):
            with _zip(log.uri, self.settings) as z:
                name = member(sample_id, epoch)
                if name in z.namelist():
                    return transcript_of(_json(z, name, MAX_SAMPLE_JSON), eval_id), log.where
        return None

    def listing(self, eval_id: str, quarantine: bool) -> list[TranscriptInfo]:
        """Every stored sample with a transcript (from the logs' sample summaries)."""
        found = []
        for log in self.logs(eval_id, quarantine):
            with _zip(log.uri, self.settings) as z:
                for s in _summaries(z):
                    info = (s.get("metadata") or {}).get("proctor") or {}
                    found.append(TranscriptInfo(sample_id=str(s.get("id")), epoch=int(s.get("epoch") or 1),
                                                shard_id=str(info.get("shard_id") or log.shard_id or ""),
                                                where=log.where, entries=int(info.get("entries") or 0)))
        return found

    def transcripts(self, eval_id: str, quarantine: bool) -> Iterator[tuple[SampleTranscript, Where]]:
        """Every stored transcript of the evaluation, one at a time."""
        for log in self.logs(eval_id, quarantine):
            with _zip(log.uri, self.settings) as z:
                for name in z.namelist():
                    if name.startswith("samples/") and name.endswith(".json"):
                        yield transcript_of(_json(z, name, MAX_SAMPLE_JSON), eval_id), log.where

    def _has(self, log: LogFile, sample_id: str, epoch: int) -> bool:
        with _zip(log.uri, self.settings) as z:
            return member(sample_id, epoch) in z.namelist()


def search(eval_id: str, pattern: str, found: Iterable[tuple[SampleTranscript, Where]], limit: int) -> TranscriptSearch:
    """The entries of `found` where `pattern` appears (case-insensitive, literal), at most
    `limit` of them: the search stops at the match after the last one returned
    (`truncated`), so that `samples` and `searched` count the transcripts read so far."""
    matches: list[TranscriptMatch] = []
    samples = searched = 0
    truncated = False
    for t, where in found:
        searched += 1
        hit = False
        for e in t.entries:
            text = excerpt(e.text(), pattern)
            if text is None:
                continue
            hit = True
            if len(matches) >= limit:
                truncated = True
                break
            matches.append(TranscriptMatch(sample_id=t.sample_id, epoch=t.epoch, shard_id=t.shard_id, where=where,
                                           n=e.n, kind=e.kind, provenance=e.provenance, role=e.role, excerpt=text))
        samples += hit
        if truncated:
            break
    return TranscriptSearch(eval_id=eval_id, pattern=pattern, matches=matches, samples=samples, searched=searched,
                            truncated=truncated)


# ---------------------------------------------------------------- zip files


@contextlib.contextmanager
def _zip(uri: str, settings: Settings) -> Iterator[zipfile.ZipFile]:
    """A stored `.eval` log opened for reading (ranged reads on S3). Raises `StorageError`."""
    import zipfile_zstd  # noqa: F401 - Inspect's logs are compressed with zstd: this teaches zipfile to read it

    fs, path = filesystem(uri, settings)
    with storage_errors("read", uri):
        f = fs.open_input_file(path)
        try:
            with zipfile.ZipFile(f) as z:
                yield z
        except zipfile.BadZipFile as exc:
            raise StorageError(f"cannot read {uri}: not a .eval log ({exc})") from exc
        finally:
            f.close()


def _json(z: zipfile.ZipFile, name: str, limit: int) -> Any:
    info = z.getinfo(name)
    if info.file_size > limit:
        raise StorageError(f"{name} in a transcript log is {info.file_size} bytes; at most {limit} are read")
    try:
        return json.loads(z.read(name))
    except ValueError as exc:
        raise StorageError(f"{name} in a transcript log is not JSON: {exc}") from exc


def _summaries(z: zipfile.ZipFile) -> list[dict[str, Any]]:
    names = set(z.namelist())
    if "summaries.json" in names:
        found = _json(z, "summaries.json", MAX_HEADER_JSON)
    else:  # a log still being written: its journal
        found = [s for n in sorted(names) if n.startswith("_journal/summaries/")
                 for s in _json(z, n, MAX_HEADER_JSON)]
    return [s for s in found if isinstance(s, dict)] if isinstance(found, list) else []


def _write_log(path: str, log: Any, samples: list[dict[str, Any]]) -> None:
    """Write an Inspect log (`.eval`) of `log`'s header and `samples` (their JSON data) to
    the local `path`, as Inspect's recorder lays one out, without its per-sample condensing
    pass (the samples are already condensed: their model inputs are ranges of a message
    pool), and deflated: Inspect's zstd costs 1-2 ms a member to set up, deflate 20 µs."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as out:
        out.writestr("_journal/start.json", json.dumps({"version": log.version, "eval": _plain(log.eval),
                                                        "plan": _plain(log.plan)}))
        for sample in samples:
            out.writestr(member(str(sample["id"]), sample["epoch"]), json.dumps(sample))
        out.writestr("summaries.json", json.dumps([sample_summary(sample) for sample in samples]))
        out.writestr("header.json", log.model_dump_json(exclude_none=True))


def _merge(shards: list[LogFile], path: str, settings: Settings, eval_id: str, summary: dict[str, Any]) -> None:
    """Write the merged log of `shards` to the local `path`: their samples and summaries,
    and a header for the whole evaluation."""
    from inspect_ai.log import EvalSpec

    headers, summaries = [], []
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as out:
        for log in shards:
            with _zip(log.uri, settings) as z:
                headers.append(_json(z, "header.json", MAX_HEADER_JSON))
                summaries += _summaries(z)
                for name in z.namelist():
                    if name.startswith("samples/"):
                        with z.open(name) as src, out.open(name, "w", force_zip64=True) as dst:
                            shutil.copyfileobj(src, dst, 1 << 20)
        first = EvalSpec.model_validate(headers[0]["eval"])
        usage = summary.get("usage") or {}
        timing = summary.get("timing") or {}
        log = eval_log(eval_id=eval_id, name=first.task, model=first.model, created=_ts(first.created) or _now(),
                       samples=None, status=str(summary.get("status") or "succeeded"),
                       started=_ts(timing.get("first_started_at")), completed=_ts(timing.get("last_completed_at")),
                       metrics=summary.get("metrics") or {}, total_samples=int(summary.get("samples") or len(summaries)),
                       completed_samples=sum(1 for s in summaries if not s.get("error")),
                       dataset=first.dataset.name, epochs=first.config.epochs or 1,
                       metadata={**(first.metadata or {}).get("proctor", {}), "shard_id": None, "attempt": None,
                                 "shards": [log.shard_id for log in shards]},
                       usage={"input_tokens": int(usage.get("input_tokens") or 0),
                              "output_tokens": int(usage.get("output_tokens") or 0)})
        out.writestr("_journal/start.json", json.dumps({"version": log.version, "eval": _plain(log.eval),
                                                        "plan": _plain(log.plan)}))
        out.writestr("summaries.json", json.dumps(summaries))
        out.writestr("header.json", log.model_dump_json(exclude_none=True))


def _plain(model: Any) -> Any:
    return json.loads(model.model_dump_json(exclude_none=True))


def _publish(uri: str, settings: Settings, write: Callable[[str], None]) -> None:
    """Have `write` make the file at a local path, then put it at `uri` whole: a temp
    file and a rename locally; on S3 one upload of a local temp file. Raises `StorageError`."""
    fs, path = filesystem(uri, settings)
    if is_s3(uri):
        with tempfile.TemporaryDirectory(prefix="proctor-log-") as tmp:
            local = os.path.join(tmp, "log.eval")
            with storage_errors("write", uri):
                write(local)

            def upload() -> None:
                with open(local, "rb") as src, fs.open_output_stream(path) as dst:
                    shutil.copyfileobj(src, dst, 8 << 20)

            retried("write", uri, settings, upload)
        return
    with storage_errors("write", uri):
        parent, _, name = path.rpartition("/")
        os.makedirs(parent, exist_ok=True)
        tmp = f"{parent}/.tmp-{name}"
        try:
            write(tmp)
            os.replace(tmp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)


def _exists(uri: str, settings: Settings) -> bool:
    fs, path = filesystem(uri, settings)
    return retried("read", uri, settings, lambda: fs.get_file_info(path).type == pafs.FileType.File)


def _dataset_name(spec: Any) -> str | None:
    if spec.dataset is None:
        return spec.inspect.task if spec.inspect is not None else None
    path = spec.dataset.path
    return str(path).rsplit("/", 1)[-1] if path else None


def _ts(value: Any) -> float | None:
    if not value:
        return None
    try:
        return datetime.fromisoformat(str(value)).timestamp()
    except ValueError:
        return None


def _now() -> float:
    import time

    return time.time()
