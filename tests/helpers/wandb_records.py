"""Read back a Weights & Biases run file (`run-ID.wandb`): a LevelDB-style log of protobuf records
after a 7-byte `:W&B` header (32 KiB blocks, each record with a 7-byte header: crc, length, type)."""

import struct

BLOCK = 32768
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_records(path):
    from wandb.proto import wandb_internal_pb2

    data = open(path, "rb").read()
    if data[:4] != b":W&B":
        raise ValueError(f"{path}: not a wandb run file")
    pos, records, parts = 7, [], b""
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:  # the rest of a block too short for a header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        pos += 7
        if kind == 0 and length == 0:
            continue
        parts += data[pos : pos + length]
        pos += length
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(parts)
            records.append(record)
            parts = b""
    return records


def history_config_summary(path):
    """(history rows as {key: json value}, config {key: json value}, summary {key: json value})."""
    history, config, summary = [], {}, {}
    for r in read_records(path):
        kind = r.WhichOneof("record_type")
        if kind == "history":
            history.append({i.key or "/".join(i.nested_key): i.value_json for i in r.history.item})
        elif kind == "run":
            config.update({i.key: i.value_json for i in r.run.config.update})
        elif kind == "config":
            config.update({i.key: i.value_json for i in r.config.update})
        elif kind == "summary":
            summary.update({i.key or "/".join(i.nested_key): i.value_json for i in r.summary.update})
    return history, config, summary


def offline_run_file(run_dir):
    """The one offline run file under `run_dir/wandb/`, complete. wandb's service process writes it
    after `finish()` returns; a command that exits stops the service (wandb's atexit hook), which
    flushes it, and a test in the same process must stop it itself before reading."""
    from pathlib import Path

    import wandb

    wandb.teardown()
    (run_file,) = list(Path(run_dir, "wandb").glob("offline-run-*/run-*.wandb"))
    return run_file
