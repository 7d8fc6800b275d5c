"""Training curves reach the trackers TRL supports: a short run with report_to="tensorboard" writes ReFINE's
metrics (rewards, NSP exact match, the NTP loss) as TensorBoard scalars."""

import struct

import pytest
from conftest import documents, small_config, tiny_delta_net
from datasets import Dataset

from trl_refine import NSPGRPOTrainer


def scalar_tags(log_dir) -> dict[str, list[float]]:
    """Read TensorBoard event files (TFRecord framing: length, crc, Event proto, crc) with tensorboardX's protos."""
    from tensorboardX.proto import event_pb2

    tags: dict[str, list[float]] = {}
    for path in log_dir.rglob("events.out.tfevents.*"):
        data = path.read_bytes()
        pos = 0
        while pos + 12 <= len(data):
            (length,) = struct.unpack("<Q", data[pos : pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12 : pos + 12 + length])
            pos += 12 + length + 4
            for value in event.summary.value:
                tags.setdefault(value.tag, []).append(value.simple_value)
    return tags


def test_tensorboard_gets_refine_metrics(tmp_path, byte_tokenizer, monkeypatch):
    pytest.importorskip("tensorboardX")
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))
    args = small_config(tmp_path, report_to=["tensorboard"], max_steps=2)
    trainer = NSPGRPOTrainer(
        tiny_delta_net(),
        args=args,
        train_dataset=Dataset.from_dict({"text": documents(4)}),
        processing_class=byte_tokenizer,
    )
    trainer.train()
    tags = scalar_tags(tmp_path / "tb")
    for tag in ("train/loss", "train/reward", "train/nsp/exact_match", "train/ntp_loss"):
        assert len(tags.get(tag, [])) == 2, (tag, sorted(tags))
