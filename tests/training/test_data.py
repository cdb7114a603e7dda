import json

import ml_collections
import numpy as np
import pytest

from jaxspec.training import data
from jaxspec.training.data import Batches, heldout_prompts, load_documents, make_datasets, pack_windows
from jaxspec.training.tokenizer import ByteTokenizer


def data_config(**overrides):
    cfg = dict(source="stdlib", tokenizer="bytes", seq_len=32, batch_size=4, val_fraction=0.1,
               max_bytes=60_000, seed=0)
    cfg.update(overrides)
    return ml_collections.ConfigDict(cfg)


def test_stdlib_batches_are_shifted_windows_of_real_text():
    train, val, tok = make_datasets(data_config())
    assert isinstance(tok, ByteTokenizer)
    batch = next(train)
    assert set(batch) == {"inputs", "targets"}
    for x in batch.values():
        assert x.shape == (4, 32) and x.dtype == np.int32
    np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])
    # Documents are BOS ... EOS delimited, and every id is a valid token.
    all_windows = np.concatenate([train.windows, val.windows])
    assert (all_windows == tok.bos_id).any() and (all_windows == tok.eos_id).any()
    assert all_windows.max() < tok.vocab_size
    docs = load_documents("stdlib", max_bytes=60_000)
    assert docs[0].name.startswith("stdlib/") and [d.name for d in docs] == sorted(d.name for d in docs)
    assert not any("/test/" in d.name or "site-packages" in d.name for d in docs)
    assert sum(len(d.text.encode()) for d in docs) <= 60_000
    # The first train window is the first train document, BOS-prefixed.
    train_idx, _ = data.split_documents([d.name for d in docs], 0.1)
    first_train = docs[train_idx[0]].text.encode()
    assert len(first_train) >= 32 and train.windows[0, 0] == tok.bos_id
    assert bytes(train.windows[0, 1:].tolist()) == first_train[:32]


def test_pack_windows_joins_documents_with_bos_eos_and_drops_the_tail():
    docs = [np.array([1, 2, 3]), np.array([4]), np.array([5, 6])]
    got = pack_windows(docs, bos_id=8, eos_id=9, window=4)
    # stream: 8 1 2 3 9 | 8 4 9 8 5 6 9  -> 12 tokens -> 3 windows of 4
    np.testing.assert_array_equal(got, [[8, 1, 2, 3], [9, 8, 4, 9], [8, 5, 6, 9]])
    assert got.dtype == np.int32
    assert pack_windows(docs, 8, 9, window=5).shape == (2, 5)


def test_split_is_disjoint_stable_and_close_to_the_fraction():
    names = [f"doc{i}.txt" for i in range(2000)]
    train, val = data.split_documents(names, 0.2)
    assert sorted(train + val) == list(range(2000)) and not set(train) & set(val)
    assert 0.17 < len(val) / 2000 < 0.23
    # A document's side depends on its name only, not on its position or on the other documents.
    _, rev_val = data.split_documents(names[::-1], 0.2)
    assert {names[::-1][i] for i in rev_val} == {names[i] for i in val}
    # Tiny corpora still get one document on each side.
    assert [len(s) for s in data.split_documents(["a", "b"], 0.01)] == [1, 1]
    assert [len(s) for s in data.split_documents(["a", "b"], 0.99)] == [1, 1]
    with pytest.raises(ValueError, match="at least 2"):
        data.split_documents(["only"], 0.5)


def test_a_corpus_keeps_its_split_when_moved(tmp_path):
    """Documents are named relative to the corpus root, so copies in two places split alike."""
    for place in ("a", "b/deeper"):
        for i in range(12):
            (tmp_path / place / "sub").mkdir(parents=True, exist_ok=True)
            (tmp_path / place / "sub" / f"doc{i}.txt").write_text(f"document {i} " * 40)
    cfg = dict(tokenizer="bytes", seq_len=16, batch_size=2, val_fraction=0.3, max_bytes=None)
    for source in (lambda place: str(tmp_path / place), lambda place: str(tmp_path / place / "sub" / "*.txt")):
        names = [[d.name for d in load_documents(source(place))] for place in ("a", "b/deeper")]
        assert names[0] == names[1] and all(not n.startswith("/") for n in names[0])
        val_a, val_b = (make_datasets(data_config(source=source(place), **cfg))[1].windows
                        for place in ("a", "b/deeper"))
        np.testing.assert_array_equal(val_a, val_b)


def _windows(n, width=5):
    return np.arange(n * width, dtype=np.int32).reshape(n, width)


def _take(stream, k):
    return [next(stream)["inputs"].copy() for _ in range(k)]


def test_each_epoch_is_a_seeded_permutation_of_all_windows():
    stream = Batches(_windows(10), batch_size=3, seed=7)
    assert stream.steps_per_epoch == 3
    epochs = []
    for _ in range(2):
        rows = np.concatenate(_take(stream, 3))[:, 0] // 5  # window index of each row
        assert len(set(rows.tolist())) == 9  # one partial batch (one window) is left out per epoch
        epochs.append(rows)
    assert not np.array_equal(epochs[0], epochs[1])
    again = Batches(_windows(10), batch_size=3, seed=7)
    np.testing.assert_array_equal(np.concatenate(_take(again, 3))[:, 0] // 5, epochs[0])
    other_seed = Batches(_windows(10), batch_size=3, seed=8)
    assert not np.array_equal(np.concatenate(_take(other_seed, 3))[:, 0] // 5, epochs[0])


@pytest.mark.parametrize("k", [0, 2, 3, 7])
def test_restored_stream_continues_identically(k):
    reference = Batches(_windows(11), batch_size=2, seed=3)
    _take(reference, k)
    state = json.loads(json.dumps(reference.state()))  # as stored in a checkpoint
    expected = _take(reference, 9)  # crosses at least one epoch boundary
    resumed = Batches(_windows(11), batch_size=2, seed=3)
    resumed.restore(state)
    assert resumed.state() == state
    for a, b in zip(_take(resumed, 9), expected):
        np.testing.assert_array_equal(a, b)


def test_restore_refuses_a_state_from_another_stream():
    stream = Batches(_windows(11), batch_size=2, seed=3)
    with pytest.raises(ValueError, match="seed"):
        stream.restore({"epoch": 0, "step": 1, "seed": 4, "num_windows": 11})
    with pytest.raises(ValueError, match="windows"):
        stream.restore({"epoch": 0, "step": 1, "seed": 3, "num_windows": 12})
    with pytest.raises(ValueError, match="out of range"):
        stream.restore({"epoch": 0, "step": 5, "seed": 3, "num_windows": 11})
    with pytest.raises(ValueError, match="lacks"):
        stream.restore({"epoch": 0})


def test_eval_pass_is_fixed_and_leaves_the_position_alone():
    _, val, _ = make_datasets(data_config())
    before = val.state()
    first = [b["inputs"] for b in val.eval_pass(max_batches=2)]
    assert len(first) == 2 and val.state() == before
    np.testing.assert_array_equal(first[0], val.windows[:4, :-1])
    np.testing.assert_array_equal(first[1], val.windows[4:8, :-1])
    assert len(list(val.eval_pass())) == val.steps_per_epoch


def _write(path, content):
    path.parent.mkdir(parents=True, exist_ok=True)
    (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
    return path


def test_glob_source_reads_txt_md_and_jsonl(tmp_path):
    _write(tmp_path / "a.txt", "alpha text")
    _write(tmp_path / "sub" / "b.md", "# beta")
    lines = [json.dumps({"text": "gamma"}), "", json.dumps({"text": "delta", "id": 2})]
    _write(tmp_path / "c.jsonl", "\n".join(lines))
    docs = load_documents(str(tmp_path / "**" / "*.*"))
    assert [d.text for d in docs] == ["alpha text", "gamma", "delta", "# beta"]
    assert docs[2].name.endswith("c.jsonl:3")
    assert [d.text for d in load_documents(str(tmp_path))] == ["alpha text", "gamma", "delta", "# beta"]
    assert [d.text for d in load_documents(str(tmp_path / "a.txt"))] == ["alpha text"]
    assert len(load_documents(str(tmp_path), max_documents=2)) == 2
    capped = load_documents(str(tmp_path), max_bytes=13)
    assert [d.text for d in capped] == ["alpha text", "gam"]


def test_bad_sources_raise_value_errors_naming_the_file(tmp_path):
    with pytest.raises(ValueError, match="matches no files"):
        load_documents(str(tmp_path / "*.txt"))
    _write(tmp_path / "empty" / "e.txt", "")
    with pytest.raises(ValueError, match="empty corpus"):
        load_documents(str(tmp_path / "empty" / "*.txt"))
    _write(tmp_path / "j" / "bad.jsonl", json.dumps({"text": "ok"}) + "\n" + json.dumps({"body": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl' line 2 has no string 'text'"):
        load_documents(str(tmp_path / "j" / "*.jsonl"))
    _write(tmp_path / "k" / "broken.jsonl", "{not json\n")
    with pytest.raises(ValueError, match=r"broken\.jsonl' line 1 is not valid JSON"):
        load_documents(str(tmp_path / "k" / "*.jsonl"))
    _write(tmp_path / "u" / "latin.txt", "caf\xe9".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin\.txt' is not valid UTF-8"):
        load_documents(str(tmp_path / "u" / "*"))
    _write(tmp_path / "s" / "x.csv", "a,b")
    with pytest.raises(ValueError, match=r"x\.csv' has an unsupported suffix"):
        load_documents(str(tmp_path / "s" / "*"))


def test_config_errors_name_the_key():
    with pytest.raises(ValueError, match="seq_len"):
        make_datasets(data_config(seq_len=0))
    with pytest.raises(ValueError, match="val_fraction"):
        make_datasets(data_config(val_fraction=1.0))
    with pytest.raises(ValueError, match="tokenizer"):
        make_datasets(data_config(tokenizer=""))
    cfg = data_config()
    del cfg["batch_size"]
    with pytest.raises(ValueError, match="batch_size"):
        make_datasets(cfg)
    with pytest.raises(ValueError, match="train split .* cannot fill one batch of 10000"):
        make_datasets(data_config(max_bytes=20_000, batch_size=10_000))


def test_heldout_prompts_come_from_validation_documents():
    cfg = data_config()
    prompts = heldout_prompts(cfg, n=6, prompt_len=16)
    assert len(prompts) == 6 and prompts == heldout_prompts(cfg, n=6, prompt_len=16)
    # First chunks of the validation documents (in corpus order), then their second chunks, and so on.
    docs = load_documents("stdlib", max_bytes=60_000)
    _, val_idx = data.split_documents([d.name for d in docs], 0.1)
    val_bytes = [docs[i].text.encode() for i in val_idx]
    expected = [b[c * 16 : (c + 1) * 16].decode("utf-8", errors="replace")
                for c in range(6) for b in val_bytes if len(b) >= (c + 1) * 16]
    assert prompts == expected[:6]
    with pytest.raises(ValueError, match="prompts of 16 tokens"):
        heldout_prompts(cfg, n=100_000, prompt_len=16)
