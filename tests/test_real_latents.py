"""GAN real data is decoded and encoded batch by batch into the store (stages/distill/real_latents.py) and read
back by index, equal to encoding the whole set at once; a rerun reuses it, a killed build resumes it."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

import dmd_core.real_data as real_data_module
import stages.distill.real_latents as real_latents_module
from dmd_core.dmd import SampleRNG
from dmd_core.real_data import count_real_samples, real_samples
from dmd_core.step import DiscriminatorLoss
from stages.config import DistillConfig
from stages.contract import Teacher
from stages.distill.real_latents import KIND, real_set, real_spec
from stages.store import LocalStore
from test_gan import write_real_shard

WORDS = ["the digit 7", "a 3", "seven", "three 3"]


def captioned_set(tmp_path, n: int = 150):
    """``n`` random 1x8x8 images (float .npy in [-1, 1]) with captions, over two tar shards."""
    images = torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    captions = [f"{WORDS[i % 4]} {i}" for i in range(n)]
    real = tmp_path / "real"
    write_real_shard(real / "real-000000.tar", images[:100], prompts=captions[:100], fmt="npy")
    write_real_shard(real / "real-000001.tar", images[100:], prompts=captions[100:], fmt="npy")
    return real, images, captions


def setting(real, n: int) -> DistillConfig:
    return DistillConfig(gan=True, regression_weight=0.0, real_data=str(real), real_samples=n)


def decode_calls(monkeypatch) -> list[int]:
    """Counts decoded images (the .npy and PNG/JPEG decoders of dmd_core.real_data)."""
    calls = []
    for name in ("_npy_image", "_decoded_image"):
        real = getattr(real_data_module, name)
        monkeypatch.setattr(real_data_module, name, lambda *a, _real=real: calls.append(1) or _real(*a))
    return calls


def output_dir(store: LocalStore):
    (out,) = [p for kind, p in store.outputs() if kind == KIND]
    return out


def output_files(store: LocalStore) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(output_dir(store).iterdir()) if f.name != "manifest.json" and not f.name.startswith(".")}


def test_stored_latents_equal_the_whole_set_encoded_at_once(tmp_path, sd_teacher, monkeypatch):
    """Bit for bit: the build encodes batches of ENCODE_BATCH starting at multiples of it (shards hold a multiple
    of it), the very batches ``encode_pixels`` makes of the whole set, so each VAE call sees the same input."""
    real, images, captions = captioned_set(tmp_path)
    teacher = Teacher.at(sd_teacher, "d" * 64)
    monkeypatch.setattr(real_latents_module, "ROWS_PER_SHARD", 64)  # shards of 64, 64 and 22 rows
    want = teacher.encode_pixels(images)  # 150 x 4 x 4 x 4
    store = LocalStore(tmp_path / "store")
    got = real_set(store, setting(real, 1000), teacher)
    assert len(got) == 150 and got.labels is None
    files = output_files(store)
    assert sorted(files) == sorted(["captions.parquet", *(f"latents-00000{k}.npy{s}" for k in range(3) for s in ("", ".sha256"))])
    stored = np.concatenate([np.load(output_dir(store) / f"latents-{k:06d}.npy") for k in range(3)])
    assert stored.dtype == np.float32 and torch.equal(torch.from_numpy(stored), want)
    idx = torch.tensor([[149, 0, 64], [63, 63, 128]])  # any shape, repeats, across shards
    assert torch.equal(got.images[idx], want[idx]) and got.images[idx].shape == (2, 3, 4, 4, 4)
    assert pq.read_table(output_dir(store) / "captions.parquet").column("prompt").to_pylist() == captions
    assert list(got.captions.read()) == captions and got.captions.count() == 150
    assert count_real_samples(real, 1000, real_spec(teacher)) == 150 == sum(1 for _ in real_samples(real, 1000, real_spec(teacher)))
    assert len(real_set(LocalStore(tmp_path / "s2"), setting(real, 70), teacher)) == 70  # the first 70, in shard order


def test_a_rerun_reuses_the_output_without_decoding(tmp_path, sd_teacher, monkeypatch):
    real, images, _ = captioned_set(tmp_path, 20)
    teacher = Teacher.at(sd_teacher, "d" * 64)
    store = LocalStore(tmp_path / "store")
    calls = decode_calls(monkeypatch)
    first = real_set(store, setting(real, 20), teacher)
    assert len(calls) == 20
    calls.clear()
    again = real_set(store, setting(real, 20), teacher)
    assert calls == [] and torch.equal(again.images[torch.arange(20)], first.images[torch.arange(20)])
    out = output_dir(store)
    m = store.read_manifest(out)
    # another process that waited on the lock while this one built finds it complete: nothing is written again
    assert store.publish_side_output(out, KIND, out.name, "x", {}, lambda work: pytest.fail("rebuilt")).created_unix == m.created_unix


def test_a_killed_build_resumes_its_finished_shards_and_gives_the_same_bytes(tmp_path, sd_teacher, monkeypatch):
    real, _, _ = captioned_set(tmp_path)
    teacher = Teacher.at(sd_teacher, "d" * 64)
    monkeypatch.setattr(real_latents_module, "ROWS_PER_SHARD", 64)
    monkeypatch.setattr(real_latents_module, "ENCODE_BATCH", 32)
    clean = LocalStore(tmp_path / "clean")
    real_set(clean, setting(real, 150), teacher)
    encoder = Teacher.pixel_encoder
    batches = []

    def dies_on_the_third_batch(self, device="cpu"):
        encode = encoder(self, device)

        def counted(images):
            batches.append(len(images))
            if len(batches) == 3:
                raise KeyboardInterrupt("killed")  # a kill: no cleanup of the partial build beyond what a kill allows
            return encode(images)

        return counted

    monkeypatch.setattr(Teacher, "pixel_encoder", dies_on_the_third_batch)
    store = LocalStore(tmp_path / "store")
    with pytest.raises(KeyboardInterrupt):
        real_set(store, setting(real, 150), teacher)
    assert [kind for kind, _ in store.outputs()] == []  # no manifest: not an output
    calls = decode_calls(monkeypatch)
    batches.clear()
    monkeypatch.setattr(Teacher, "pixel_encoder", lambda self, device="cpu": encoder(self, device))
    got = real_set(store, setting(real, 150), teacher)
    assert len(calls) == 150 - 64  # shard 0 was kept: only the samples of shards 1 and 2 are decoded again
    assert output_files(store) == output_files(clean) and len(got) == 150


def test_the_discriminator_step_equals_the_in_memory_path(tmp_path, edm_teacher):
    """PNGs with classes for a pixel teacher: the head's loss on rows read by index equals the loss on the set
    held as one tensor, with the same draws (the same rng)."""
    from accelerate import Accelerator

    from conftest import write_config
    from stages import chain, distill
    from stages.config import load_config

    g = torch.Generator().manual_seed(0)
    pixels, classes = torch.randint(0, 256, (12, 1, 8, 8), generator=g), torch.arange(12) % 10
    real = write_real_shard(tmp_path / "real.tar", pixels, classes)
    base = write_config(tmp_path / "c.yaml", edm_teacher, tmp_path / "store", distill={"gan": True, "regression_weight": 0.0, "steps": 2})
    cfg = load_config(base, [f"distill.real_data={real}"])
    tr = distill.Trainer(cfg, chain.plan(cfg, "distill"), Accelerator(cpu=True))
    assert torch.equal(tr.real_labels, classes) and (tmp_path / "store" / KIND).is_dir()
    held = DiscriminatorLoss(tr.gan_logits, tr.fake, tr.unwrap(tr.fake), pixels.float() / 127.5 - 1, classes)
    x, labels = torch.randn(4, 1, 8, 8, generator=g), classes[:4]
    got, want = tr.discriminator(x, labels, SampleRNG(0, 10, 0, range(4))), held(x, labels, SampleRNG(0, 10, 0, range(4)))
    assert {k: float(v.detach()) for k, v in got.items()} == {k: float(v.detach()) for k, v in want.items()}
    flipped = DiscriminatorLoss(tr.gan_logits, tr.fake, tr.unwrap(tr.fake), pixels.flip(0).float() / 127.5 - 1, classes.flip(0))
    assert float(flipped(x, labels, SampleRNG(0, 10, 0, range(4)))["loss_gan_d"].detach()) != float(got["loss_gan_d"].detach())  # the rows matter
