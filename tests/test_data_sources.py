"""Data beyond JSON (finechat.data.sources, records, mixing): Parquet, Arrow, datasets folders, hub cache names and
compressed JSONL read to the same Conversations as the JSONL of the same records; bad files give one line."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import pytest

from finechat.cli import main as cli
from finechat.data.formats import ReadResult, iter_conversations, read_conversations
from finechat.data.mixing import MixSettings, SourceCounter, interleave
from finechat.data.records import iter_json_records
from finechat.errors import ConfigError, DataError, DataFileError

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
datasets = pytest.importorskip("datasets")
zstandard = pytest.importorskip("zstandard")

SAMPLES = Path(__file__).resolve().parent.parent / "data" / "samples"
SFT_SAMPLES = ["alpaca.json", "sharegpt.json", "sharegpt_tools.json", "openai.jsonl", "moss.jsonl",
               "moss_plugin.jsonl", "dolly.jsonl", "adgen.json", "chatglm_tuning.jsonl", "huatuo.json",
               "chatdoctor.json", "prompt_response_history.jsonl"]


def records_of(path: Path) -> list[dict]:
    return [rec for _, rec, _ in iter_json_records(path)]


def table_of(records: list[dict]):
    """An Arrow table whose schema covers every record (pa.Table.from_pylist would look at the first only)."""
    return pa.Table.from_struct_array(pa.array(records))


def write_forms(records: list[dict], folder: Path, stem: str) -> dict[str, Path]:
    """The records as JSONL and in every other supported form."""
    folder.mkdir(parents=True, exist_ok=True)
    jsonl = folder / f"{stem}.jsonl"
    jsonl.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    forms = {"jsonl": jsonl, "gz": folder / f"{stem}.jsonl.gz", "zst": folder / f"{stem}.jsonl.zst",
             "parquet": folder / f"{stem}.parquet", "arrow": folder / f"{stem}.arrow",
             "datasets": folder / f"{stem}_saved", "shards": folder / f"{stem}_shards"}
    forms["gz"].write_bytes(gzip.compress(jsonl.read_bytes()))
    forms["zst"].write_bytes(zstandard.ZstdCompressor().compress(jsonl.read_bytes()))
    table = table_of(records)
    pq.write_table(table, forms["parquet"])
    with pa.OSFile(str(forms["arrow"]), "wb") as f, pa.ipc.new_file(f, table.schema) as w:
        w.write_table(table)
    datasets.Dataset(table).save_to_disk(str(forms["datasets"]))
    forms["shards"].mkdir()
    half = max(1, len(records) // 2)
    pq.write_table(table.slice(0, half), forms["shards"] / "train-00000-of-00002.parquet")
    pq.write_table(table.slice(half), forms["shards"] / "train-00001-of-00002.parquet")
    return forms


def conversations(path) -> list[dict]:
    """What the reader made, without where it came from."""
    return [{**c.to_dict(), "source": None, "line": None} for c in read_conversations(str(path)).conversations]


@pytest.mark.parametrize("sample", SFT_SAMPLES)
def test_every_form_reads_to_the_same_conversations_as_jsonl(sample, tmp_path):
    forms = write_forms(records_of(SAMPLES / sample), tmp_path, Path(sample).stem)
    expected = conversations(forms["jsonl"])
    assert expected and expected == conversations(SAMPLES / sample)
    for name, path in forms.items():
        assert conversations(path) == expected, name
    rows = read_conversations(str(forms["parquet"])).conversations
    assert [c.line for c in rows] == list(range(1, len(rows) + 1))  # row numbers, as lines number JSONL
    assert {c.source for c in rows} == {str(forms["parquet"])}


def test_bad_records_in_parquet_are_counted_with_file_and_row(tmp_path):
    records = [{"instruction": "a", "output": "b"}, {"instruction": "c", "output": ""},
               {"instruction": "d", "output": "e"}, {"instruction": "f"}]
    forms = write_forms(records, tmp_path, "bad")
    result = read_conversations(str(forms["parquet"]), on_bad_record="skip")
    assert len(result.conversations) == 2
    assert [(Path(f).name, row, field) for f, row, field, _ in result.skipped] == [
        ("bad.parquet", 2, "turns[1]"), ("bad.parquet", 4, "output")]
    with pytest.raises(DataError, match=r"bad\.parquet:2: turns\[1\]: empty answer"):
        read_conversations(str(forms["parquet"]))
    gz = read_conversations(str(forms["gz"]), on_bad_record="skip")
    assert [(row, field) for _, row, field, _ in gz.skipped] == [(2, "turns[1]"), (4, "output")]


def _cli_error(args: list[str], capsys) -> tuple[int, str]:
    code = cli(args)
    err = capsys.readouterr().err.strip().splitlines()
    return code, err[-1] if err else ""


def test_damaged_files_and_wrong_columns_give_one_line(tmp_path, capsys):
    forms = write_forms(records_of(SAMPLES / "dolly.jsonl") * 30, tmp_path, "dolly")
    cut = {}
    for name in ("gz", "zst", "parquet"):
        data = forms[name].read_bytes()
        cut[name] = tmp_path / f"cut_{forms[name].name}"
        cut[name].write_bytes(data[: len(data) // 2])
    out = str(tmp_path / "out.jsonl")
    code, line = _cli_error(["data", "convert", str(cut["gz"]), "--to", "openai", out], capsys)
    assert code == DataFileError.exit_code == 2 and "cut_dolly.jsonl.gz:" in line and "(gzip): damaged compressed file" in line
    code, line = _cli_error(["data", "convert", str(cut["zst"]), "--to", "openai", out], capsys)
    assert code == DataFileError.exit_code == 2 and "cut_dolly.jsonl.zst:" in line and "truncated" in line
    code, line = _cli_error(["data", "convert", str(cut["parquet"]), "--to", "openai", out], capsys)
    assert code == DataFileError.exit_code == 2 and "cut_dolly.parquet: (parquet): not a readable Parquet file" in line
    wrong = tmp_path / "wrong.parquet"
    pq.write_table(pa.table({"question_text": ["a"], "label": [1]}), wrong)
    code, line = _cli_error(["data", "convert", str(wrong), "--to", "openai", out], capsys)
    assert code == DataFileError.exit_code == 2
    assert "wrong.parquet:1: cannot tell the data format from the keys question_text, label" in line
    code, line = _cli_error(["data", "convert", str(wrong), "--format", "alpaca", "--to", "openai", out], capsys)
    assert code == 2 and "wrong.parquet: (parquet): no column 'instruction', which format alpaca needs" in line
    assert "question_text, label" in line
    assert not Path(out).exists()
    code, line = _cli_error(["data", "convert", str(tmp_path / "absent.parquet"), "--to", "openai", out], capsys)
    assert code == 2 and "absent.parquet: no such data file" in line
    # a bad record inside a readable file stays exit 3 (DataError), not a damaged file
    bad = tmp_path / "bad_row.parquet"
    pq.write_table(pa.table({"instruction": ["a", "b"], "input": ["", ""], "output": ["ok", " "]}), bad)
    code, line = _cli_error(["data", "convert", str(bad), "--to", "openai", out], capsys)
    assert code == DataError.exit_code == 3 and "bad_row.parquet:2: " in line


def _fake_hub_cache(cache: Path, records: list[dict]) -> None:
    """What `datasets` leaves in its cache after loading org/toy_set (its Cache builder's layout)."""
    ds = datasets.Dataset(table_of(records))
    entry = cache / "org___toy_set" / "default" / "0.0.0" / "0123abcd"
    entry.mkdir(parents=True)
    with pa.OSFile(str(entry / "toy_set-train.arrow"), "wb") as f, pa.ipc.new_stream(f, ds.data.table.schema) as w:
        w.write_table(ds.data.table)
    info = ds.info
    info.config_name, info.dataset_name = "default", "toy_set"
    info.splits = datasets.SplitDict({"train": datasets.SplitInfo("train", num_examples=len(records),
                                                                 dataset_name="toy_set")})
    info.write_to_directory(str(entry))


def test_hub_names_read_from_the_local_cache_and_say_how_to_get_a_local_copy(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    records = records_of(SAMPLES / "alpaca.json")
    _fake_hub_cache(tmp_path / "hf", records)
    expected = conversations(write_forms(records, tmp_path / "forms", "alpaca")["jsonl"])
    assert conversations("hub:org/toy_set") == conversations("hub:org/toy_set@train") == expected
    code, line = _cli_error(["data", "convert", "hub:org/missing_set:zh@test", "--to", "openai",
                             str(tmp_path / "o.jsonl")], capsys)
    assert code == ConfigError.exit_code
    assert "hub:org/missing_set:zh@test: data set org/missing_set (subset zh), split test, is not in the local " \
           "datasets cache" in line and "HF_HUB_OFFLINE is set" in line and "save_to_disk" in line
    # Online but with no route to the hub: one quick connection attempt, no retries, and the line says so.
    import socket

    from huggingface_hub import constants

    with socket.socket() as closed:  # a local port that nothing listens on: the connection is refused at once
        closed.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{closed.getsockname()[1]}"
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    for var in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)  # (behind a proxy the probe leaves the decision to datasets)
    code, line = _cli_error(["data", "convert", "hub:org/missing_set", "--to", "openai", str(tmp_path / "o.jsonl")],
                            capsys)
    assert code == ConfigError.exit_code
    assert f"the hub ({endpoint}) cannot be reached from this machine" in line and "save_to_disk" in line
    with pytest.raises(ConfigError, match="expected hub:ORG/NAME"):
        read_conversations("hub:a/b/c")


def test_reading_is_lazy_one_record_at_a_time(tmp_path):
    """The reader is a generator: taking 3 conversations from a big file reads a bounded part of it, and a
    record after a bad one is not reached until the consumer gets there."""
    records = records_of(SAMPLES / "dolly.jsonl") * 2000
    forms = write_forms(records + [{"instruction": "x"}], tmp_path, "big")
    for name in ("jsonl", "gz", "zst", "parquet", "datasets"):
        result = ReadResult([])
        stream = iter_conversations(str(forms[name]), result)
        first = [next(stream) for _ in range(3)]  # the bad last record would raise if the file were read whole
        assert [c.line for c in first] == [1, 2, 3], name
        stream.close()
    import tracemalloc

    for name in ("jsonl", "gz"):  # memory while reading does not grow with the file
        tracemalloc.start()
        try:
            stream = iter_conversations(str(forms[name]), ReadResult([]))
            for _ in range(3000):
                next(stream)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        stream.close()
        assert peak < forms["jsonl"].stat().st_size / 10, (name, peak)
    stream = iter_conversations(str(forms["parquet"]), ReadResult([]))
    with pytest.raises(DataError, match=r"big\.parquet:6001: response: missing field"):
        for _ in stream:
            pass


def test_mixing_is_deterministic_counts_rows_per_source_and_checks_its_ratios():
    a, b = [f"a{i}" for i in range(100)], [f"b{i}" for i in range(20)]

    def run(stop: str, seed: int) -> tuple[list, list]:
        counter = SourceCounter(["a", "b"])
        out = list(interleave([lambda: iter(a), lambda: iter(b)], MixSettings([0.7, 0.3], stop, seed), counter))
        return out, counter.rows

    first, counts = run("first_exhausted", 1)
    assert (first, counts) == run("first_exhausted", 1)
    assert first != run("first_exhausted", 2)[0]
    assert counts[1] == 20 and counts == [sum(x.startswith("a") for x in first), 20] and 20 < counts[0] < 100
    every, counts = run("all_exhausted", 1)
    assert counts[0] == 100 and counts[1] > 20  # b started again until a ran out too
    assert every.count("b0") >= 2 and every.count("a0") == 1
    for ratios, match in (([0.7, 0.4], "sum to 1.1, not 1"), ([1.2, -0.2], r"mix\[1\]: -0.2 is not a ratio")):
        with pytest.raises(ConfigError, match=match):
            MixSettings(ratios)
    with pytest.raises(ConfigError, match="2 ratios for 3 data sources"):
        MixSettings([0.5, 0.5]).check(3)


def test_bad_mix_and_streaming_without_max_steps_exit_2(tmp_path, capsys):
    data = str(SAMPLES / "alpaca.json")
    code, line = _cli_error(["train", f"data=[{data},{data}]", "mix=[0.7,0.4]", f"output_dir={tmp_path}"], capsys)
    assert code == 2 and "mix: the ratios [0.7, 0.4] sum to 1.1, not 1" in line
    code, line = _cli_error(["train", f"data=[{data},{data}]", "mix=[1.5,-0.5]", f"output_dir={tmp_path}"], capsys)
    assert code == 2 and "mix[1]: -0.5 is not a ratio >= 0" in line
    code, line = _cli_error(["train", f"data=[{data}]", "streaming=true", f"output_dir={tmp_path}"], capsys)
    assert code == 2 and "streaming: true needs max_steps" in line


def test_folder_of_parquet_shards_and_datasetdict_folder(tmp_path):
    records = records_of(SAMPLES / "openai.jsonl")
    forms = write_forms(records, tmp_path, "o")
    dd = datasets.DatasetDict({"train": datasets.Dataset(table_of(records)), "test": datasets.Dataset(table_of(records[:1]))})
    dd.save_to_disk(str(tmp_path / "dd"))
    assert conversations(tmp_path / "dd") == conversations(forms["jsonl"])
    only_test = datasets.DatasetDict({"test": datasets.Dataset(table_of(records[:1]))})
    only_test.save_to_disk(str(tmp_path / "dd_test"))
    with pytest.raises(DataError, match="without a train split"):
        read_conversations(str(tmp_path / "dd_test"))
    shutil.rmtree(forms["datasets"])
    assert conversations(forms["shards"]) == conversations(forms["jsonl"])
