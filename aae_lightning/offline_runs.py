"""Reads what a W&B run recorded locally, with no server: its ``run-*.wandb`` file is a
LevelDB-style record log (32 KiB blocks, 7-byte chunk headers) of ``wandb_internal_pb2.Record``
messages. wandb 0.31 has no public reader for offline runs and writes no summary json; the
offline sweep runner reads its trials' metrics with this, and the tests check runs with it."""

import json
import struct
import time
from pathlib import Path

from wandb.proto import wandb_internal_pb2

BLOCK = 32768
FILE_HEADER = 7  # b":W&B", magic 0xBEE1, version
CHUNK_HEADER = 7  # crc32, length, type
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_records(path: Path) -> list:
    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a W&B record log")
    records, pending, pos = [], b"", FILE_HEADER
    while pos + CHUNK_HEADER <= len(data):
        if BLOCK - pos % BLOCK < CHUNK_HEADER:
            pos += BLOCK - pos % BLOCK  # block trailer too small for a header: zero padding
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + CHUNK_HEADER])
        payload = data[pos + CHUNK_HEADER : pos + CHUNK_HEADER + length]
        if len(payload) < length:
            break  # a run still being written: the last chunk is not complete yet
        pos += CHUNK_HEADER + length
        if kind == 0 and length == 0:
            continue
        pending = payload if kind in (FULL, FIRST) else pending + payload
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


class OfflineRun:
    """History rows, final summary and config of one offline run directory."""

    def __init__(self, run_dir: Path):
        self.dir = Path(run_dir)
        (log,) = self.dir.glob("run-*.wandb")
        self.id = log.stem.removeprefix("run-")
        self.history: list[dict] = []
        self.summary: dict = {}
        self.config: dict = {}
        # the exit record comes last, when the run has ended and everything before it is written
        self.finished = False
        for record in read_records(log):
            kind = record.WhichOneof("record_type")
            self.finished |= kind == "exit"
            if kind == "history":
                self.history.append({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item})
            elif kind == "summary":
                for item in record.summary.update:
                    self.summary[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
            elif kind == "config":
                for item in record.config.update:
                    self.config[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)

    def values(self, key: str) -> list:
        return [row[key] for row in self.history if key in row]

    def media(self) -> list[Path]:
        return sorted((self.dir / "files" / "media").rglob("*.png"))


def poll(read, done, wait_s: float):
    """``read()`` every 0.2 s until ``done`` holds for what it read or ``wait_s`` seconds have passed;
    the last reading. W&B's service process writes a run's last records after ``wandb.finish()``
    has returned, so a reader waits for them."""
    deadline = time.monotonic() + wait_s
    while True:
        result = read()
        if done(result) or time.monotonic() > deadline:
            return result
        time.sleep(0.2)


def offline_runs(root: Path, wait_s: float = 60.0) -> list[OfflineRun]:
    """Every offline run under ``root`` (oldest first), read once each run's latest part has
    finished or after ``wait_s`` seconds. (A killed run never finishes; its resumed part does.)"""
    def read():
        return [OfflineRun(d) for d in sorted(Path(root).rglob("offline-run-*"), key=lambda d: d.name) if d.is_dir()]

    return poll(read, lambda runs: all(r.finished for r in {r.id: r for r in runs}.values()), wait_s)
