"""Training on data beyond RAM: the memory-mapped tokenized cache (reused by a second run), streaming with
max_steps, mixing with rows per source in the run report, and published preference data in Parquet."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tiny import make_tokenizer

from finechat.data.templates import get_template
from finechat.data.token_cache import TokenRows, build_dataset
from finechat.data.tokenize import TokenizeSettings
from finechat.train.recipe import run_training
from finechat.train.train_config import TrainConfig

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

SAMPLES = Path(__file__).resolve().parent.parent / "data" / "samples"
PUBLISHED = SAMPLES / "published"


def adgen_rows(n: int, tag: str) -> list[dict]:
    return [{"content": f"类型#上衣*颜色#{tag}{i}", "summary": f"这件{tag}{i}的上衣采用简约的设计。"} for i in range(n)]


def write_parquet(rows: list[dict], path: Path) -> Path:
    pq.write_table(pa.Table.from_struct_array(pa.array(rows)), path)
    return path


def test_cache_is_memory_mapped_and_reused(tmp_path):
    import numpy as np

    data = write_parquet(adgen_rows(40, "白色"), tmp_path / "a.parquet")
    tok, t = make_tokenizer(), get_template("chatml")
    rows, stats = build_dataset(str(data), tok, t, TokenizeSettings(), cache_dir=tmp_path / "c", progress=False)
    again, stats2 = build_dataset(str(data), tok, t, TokenizeSettings(), cache_dir=tmp_path / "c", progress=False)
    assert isinstance(rows, TokenRows) and isinstance(again, TokenRows)
    assert not stats.from_cache and stats2.from_cache and stats2.cache_file == stats.cache_file
    assert [p.name for p in (tmp_path / "c").iterdir()] == [Path(stats.cache_file).name]  # one entry, reused
    assert isinstance(again._arrays["input_ids"], np.memmap)  # read from disk as rows are asked for
    fresh, _ = build_dataset(str(data), tok, t, TokenizeSettings(), use_cache=False, progress=False)
    assert isinstance(fresh, list) and again == fresh and len(again) == 40
    assert again[3] == fresh[3] and again[5:9] == fresh[5:9] and again.select([7, 2]) == [fresh[7], fresh[2]]
    assert stats2.sources == [{"source": str(data), "rows": 40}]


def _cfg(tiny_model_dir, tmp_path, **kw) -> TrainConfig:
    settings = dict(model=str(tiny_model_dir), output_dir=str(tmp_path / "out"), max_steps=2, save_steps=2,
                    logging_steps=1, per_device_train_batch_size=2, report_to=["none"], lora_rank=4, cutoff_len=64,
                    lora_target=["q_proj", "v_proj"], seed=0)
    settings.update(kw)
    return TrainConfig(**settings)


def test_streaming_run_trains_with_max_steps_without_a_cache(tiny_model_dir, tmp_path):
    data = write_parquet(adgen_rows(3, "红色"), tmp_path / "s.parquet")  # 3 rows: 2 steps of 2 need a second pass
    result = run_training(_cfg(tiny_model_dir, tmp_path, data=[str(data)], streaming=True, max_steps=3),
                          cache_dir=str(tmp_path / "cache"))
    assert result.global_step == 3 and result.final_checkpoint
    assert not (tmp_path / "cache").exists()  # nothing tokenized ahead
    run = json.loads((Path(result.final_checkpoint) / "finechat_run.json").read_text())
    assert run["data"]["streaming"] is True


def test_mixed_run_names_each_source_and_its_rows(tiny_model_dir, tmp_path):
    a = write_parquet(adgen_rows(30, "白色"), tmp_path / "a.parquet")
    b = tmp_path / "b.jsonl"
    b.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in adgen_rows(6, "蓝色")), encoding="utf-8")
    cfg = _cfg(tiny_model_dir, tmp_path, data=[str(a), str(b)], mix=[0.5, 0.5], datasets=["adgen", "finechat-samples"])
    result = run_training(cfg, cache_dir=str(tmp_path / "cache"))
    licences = json.loads((Path(result.output_dir) / "finechat_licenses.json").read_text())
    sources = licences["data_sources"]
    assert [s["source"] for s in sources] == [str(a), str(b)] and sources[1]["rows"] == 6
    assert 0 < sources[0]["rows"] < 30  # first_exhausted: b ran out first
    assert [s["dataset"] for s in sources] == ["adgen", "finechat-samples"]
    summary = json.loads((Path(result.output_dir) / "train_results.json").read_text())
    assert summary["data"]["sources"] == [{"source": s["source"], "rows": s["rows"]} for s in sources]
    again = run_training(_cfg(tiny_model_dir, tmp_path, data=[str(a), str(b)], mix=[0.5, 0.5],
                              output_dir=str(tmp_path / "again")), cache_dir=str(tmp_path / "cache"))
    assert json.loads((Path(again.output_dir) / "finechat_licenses.json").read_text())["data_sources"][0]["rows"] \
        == sources[0]["rows"]  # the same seed mixes the same rows


def test_published_preference_data_in_parquet_trains_with_every_record(tiny_model_dir, tmp_path):
    from finechat.data.records import iter_json_records

    files, total = [], 0
    for src in sorted(PUBLISHED.iterdir()):
        records = [rec for _, rec, _ in iter_json_records(src)]
        total += len(records)
        files.append(str(write_parquet(records, tmp_path / f"{src.stem}.parquet")))
    cfg = TrainConfig(model=str(tiny_model_dir), stage="dpo", data=files, max_steps=2, save_steps=2, logging_steps=1,
                      per_device_train_batch_size=4, lora_rank=4, output_dir=str(tmp_path / "dpo"),
                      report_to=["none"], cutoff_len=256, seed=0)
    result = run_training(cfg)
    data = json.loads((Path(result.final_checkpoint) / "finechat_run.json").read_text())["data"]
    assert result.global_step == 2
    assert (data["records"], data["train_rows"], data["skipped_records"], data["no_room"]) == (total, total, 0, 0)


def test_packed_run_trains_from_the_memory_mapped_cache(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    from finechat.data.token_cache import PackedRows
    from finechat.train.sft import read_sft

    data = write_parquet(adgen_rows(24, "黑色"), tmp_path / "p.parquet")
    cfg = _cfg(tiny_model_dir, tmp_path, data=[str(data)], packing=True, val_size=0, cutoff_len=256)
    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    train, _, info = read_sft(cfg, tok, get_template("chatml"), cache_dir=str(tmp_path / "cache"))
    assert isinstance(train, PackedRows) and info["train_rows"] == len(train) < 24
    assert all(len(r["input_ids"]) <= 256 for r in train) and sum(len(r["seq_lengths"]) for r in train) == 24
    result = run_training(cfg, cache_dir=str(tmp_path / "cache"))
    assert result.global_step == 2 and result.final_checkpoint
