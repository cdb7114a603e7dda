import itertools
import json
import os
import sys

import numpy as np
import pytest

from jaxspec.training.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer

TEXT = "def f(x):\n    return x + 1  # café ✓ 你好\n"
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2 as in SmolLM2
TEXTS = [
    "hello world",
    "The cat sat on the mat.\n\nNew  lines and   spaces\t too",
    "digits 12345 and unicode café ✓ 你好",
    "code: def f(x):\n    return x + 1",
    "<|im_start|>user\nhi there<|im_end|>\n",
    "",
]
# SmolLM2-135M-Instruct's chat template, as its checkpoint ships it.
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CHATS = [
    [{"role": "user", "content": "What is 2 + 2?"}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Name a cat."},
     {"role": "assistant", "content": "Tom."}, {"role": "user", "content": "Another one, café ✓?"}],
]


def test_bytes_round_trip_and_specials():
    tok = load_tokenizer("bytes")
    assert isinstance(tok, ByteTokenizer)
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id, tok.eos_ids) == (259, 256, 257, 258, (257,))
    ids = tok.encode(TEXT)
    assert ids == list(TEXT.encode("utf-8"))
    assert tok.decode(ids) == TEXT
    wrapped = tok.encode(TEXT, add_bos=True, add_eos=True)
    assert wrapped == [256] + ids + [257]
    assert tok.encode_prompt(TEXT) == [256] + ids  # toy models are trained with a BOS before each document
    # Specials (including PAD) are dropped on decode, or spelled out when asked for.
    assert tok.decode([258, *wrapped, 258]) == TEXT
    assert tok.decode([256, *b"hi", 257], skip_special_tokens=False) == "<bos>hi<eos>"
    np.testing.assert_array_equal(tok.encode_batch([TEXT, ""])[0], np.asarray(ids, np.int32))
    assert tok.encode_batch([TEXT, ""])[1].shape == (0,)


def test_bytes_tokenizer_has_no_chat_template():
    tok = ByteTokenizer()
    assert tok.chat_template is None
    for call in (tok.apply_chat_template, tok.encode_chat):
        with pytest.raises(ValueError, match="no chat template"):
            call(CHATS[0])


def test_bytes_decode_replaces_invalid_utf8_and_rejects_out_of_range_ids():
    tok = ByteTokenizer()
    cut = "é".encode()[:1]  # first byte of a two-byte character
    assert tok.decode([*b"ab", *cut, *b"c"]) == "ab\ufffdc"
    assert tok.decode(np.array([104, 105], np.int32)) == "hi"
    with pytest.raises(ValueError, match="259"):
        tok.decode([104, 259])
    with pytest.raises(ValueError, match="-1"):
        tok.decode([-1])


def test_load_tokenizer_errors_name_the_path(tmp_path):
    missing = tmp_path / "nope" / "tokenizer.json"
    with pytest.raises(ValueError, match="nope"):
        load_tokenizer(str(missing))
    with pytest.raises(ValueError, match="bytes"):
        load_tokenizer("")
    with pytest.raises(ValueError, match="has no tokenizer.json"):
        load_tokenizer(str(tmp_path))


def test_missing_tokenizers_package_names_the_hf_extra(tmp_path, monkeypatch):
    path = tmp_path / "tokenizer.json"
    path.write_text("{}")
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # makes `import tokenizers` fail
    with pytest.raises(ImportError, match=r"jaxspec\[hf\]"):
        load_tokenizer(str(path))


def test_unparsable_tokenizer_file_names_the_file(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text(json.dumps({"model": {"type": "NoSuchModel"}}))
    with pytest.raises(ValueError, match="broken.json"):
        load_tokenizer(str(path))


# ------------------------------------------------------------------------ Hugging Face directories vs transformers

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")


@pytest.fixture(scope="module")
def bpe_json(tmp_path_factory) -> str:
    """A tiny byte-level BPE (SmolLM2-style specials), trained once, serialised as tokenizer.json text."""
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = [t for t in TEXTS if t] + [m["content"] for c in CHATS for m in c] + ["the cat and the hat"] * 5
    tok.train_from_iterator(corpus * 4, trainer)
    return tok.to_str()


def write_dir(root, name, tokenizer_json, *, bos_in_post_processor=False, **files) -> str:
    """A Hugging Face tokenizer directory: tokenizer.json plus `files` (file stem -> JSON object or, for
    chat_template.jinja, text). With `bos_in_post_processor` the tokenizer.json itself adds <|im_start|>."""
    directory = os.path.join(str(root), name)
    os.makedirs(directory)
    tok = tokenizers.Tokenizer.from_str(tokenizer_json)
    if bos_in_post_processor:
        tok.post_processor = tokenizers.processors.TemplateProcessing(
            single="<|im_start|> $A", pair="<|im_start|> $A <|im_start|> $B", special_tokens=[("<|im_start|>", 1)])
    tok.save(os.path.join(directory, "tokenizer.json"))
    for stem, content in files.items():
        if stem == "chat_template":
            with open(os.path.join(directory, "chat_template.jinja"), "w") as fh:
                fh.write(content)
        else:
            with open(os.path.join(directory, f"{stem}.json"), "w") as fh:
                json.dump(content, fh)
    return directory


def reference(directory):
    return transformers.AutoTokenizer.from_pretrained(directory)


def reference_stop_ids(directory) -> tuple[int, ...]:
    """The eos ids transformers' generate stops at for a model saved in `directory`."""
    if os.path.isfile(os.path.join(directory, "generation_config.json")):
        ids = transformers.GenerationConfig.from_pretrained(directory).eos_token_id
    elif os.path.isfile(os.path.join(directory, "config.json")):  # what a model's from_pretrained falls back to
        ids = transformers.GenerationConfig.from_pretrained(directory, config_file_name="config.json").eos_token_id
    else:
        ids = transformers.GenerationConfig().eos_token_id
    return () if ids is None else tuple(ids) if isinstance(ids, list) else (ids,)


def assert_encodes_like(tok, ref, texts=tuple(TEXTS)):
    assert tok.vocab_size == len(ref)
    for text in texts:
        assert tok.encode_prompt(text) == ref(text)["input_ids"], text
        assert tok.encode(text) == ref(text, add_special_tokens=False)["input_ids"], text
        ids = ref(text)["input_ids"]
        for skip in (True, False):
            assert tok.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip)


SMOLLM2_CONFIG = {"tokenizer_class": "GPT2Tokenizer", "bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
                  "pad_token": "<|im_end|>", "unk_token": "<|endoftext|>", "add_prefix_space": False,
                  "clean_up_tokenization_spaces": False, "model_max_length": 8192, "chat_template": SMOLLM2_TEMPLATE}


def test_smollm2_style_directory_matches_transformers(tmp_path, bpe_json):
    directory = write_dir(tmp_path, "smol", bpe_json, tokenizer_config=SMOLLM2_CONFIG,
                          config={"model_type": "llama", "bos_token_id": 1, "eos_token_id": 2},
                          generation_config={"bos_token_id": 1, "eos_token_id": 2})
    tok, ref = load_tokenizer(directory), reference(directory)
    assert isinstance(tok, HFTokenizer)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (ref.bos_token_id, ref.eos_token_id, ref.pad_token_id) == (1, 2, 2)
    assert tok.eos_ids == reference_stop_ids(directory) == (2,)
    assert tok.special_tokens == ref.special_tokens_map
    assert_encodes_like(tok, ref)
    assert tok.chat_template == SMOLLM2_TEMPLATE
    for messages, generation_prompt in itertools.product(CHATS, (True, False)):
        text = tok.apply_chat_template(messages, add_generation_prompt=generation_prompt)
        assert text == ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
        ids = tok.encode_chat(messages, add_generation_prompt=generation_prompt)
        assert ids == ref.apply_chat_template(messages, add_generation_prompt=generation_prompt)["input_ids"]
        assert ids[0] == 1 and tok.decode(ids, skip_special_tokens=False) == text


@pytest.mark.parametrize("bos_in_post_processor,add_bos_token", itertools.product((True, False), (True, False)))
def test_bos_is_added_where_the_tokenizer_json_adds_it(tmp_path, bpe_json, bos_in_post_processor, add_bos_token):
    # transformers ignores tokenizer_config.json's add_bos_token when a tokenizer.json is present: its
    # post-processor alone decides, and so it does here.
    config = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "add_bos_token": add_bos_token}
    directory = write_dir(tmp_path, "d", bpe_json, bos_in_post_processor=bos_in_post_processor,
                          tokenizer_config=config)
    tok, ref = load_tokenizer(directory), reference(directory)
    assert_encodes_like(tok, ref)
    assert (tok.encode_prompt("hello")[0] == tok.bos_id == 1) == bos_in_post_processor
    assert tok.encode("hello", add_bos=True, add_eos=True) == [1, *tok.encode("hello"), 2]


def test_eos_named_only_in_config_json(tmp_path, bpe_json):
    directory = write_dir(tmp_path, "d", bpe_json, tokenizer_config={"bos_token": "<|im_start|>"},
                          config={"model_type": "llama", "eos_token_id": 2})
    tok, ref = load_tokenizer(directory), reference(directory)
    assert ref.eos_token is None  # transformers' tokenizer does not know it; its generate does
    assert tok.eos_ids == reference_stop_ids(directory) == (2,)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 2)
    assert_encodes_like(tok, ref)


def test_a_list_of_eos_ids_is_the_stop_set(tmp_path, bpe_json):
    generation = {"bos_token_id": 1, "eos_token_id": [0, 2], "pad_token_id": 0}
    config = {"model_type": "llama", "eos_token_id": 1}  # ignored beside a generation_config.json
    directory = write_dir(tmp_path, "own", bpe_json, tokenizer_config={"eos_token": "<|im_end|>"},
                          config=config, generation_config=generation)
    tok = load_tokenizer(directory)
    assert tok.eos_ids == reference_stop_ids(directory) == (0, 2)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 0)  # eos_id: the tokenizer's own EOS
    directory = write_dir(tmp_path, "none", bpe_json, generation_config={"eos_token_id": [2, 0]})
    tok = load_tokenizer(directory)
    assert (tok.eos_ids, tok.eos_id, tok.pad_id, tok.bos_id) == ((2, 0), 2, 2, None)  # first of the list


def test_a_tokenizer_without_eos_is_valid(tmp_path, bpe_json):
    directory = write_dir(tmp_path, "d", bpe_json)
    tok, ref = load_tokenizer(directory), reference(directory)
    assert (tok.bos_id, tok.eos_id, tok.eos_ids, tok.pad_id) == (None, None, (), 0)
    assert reference_stop_ids(directory) == () and ref.eos_token is None
    assert_encodes_like(tok, ref)
    with pytest.raises(ValueError, match="no chat template"):
        tok.apply_chat_template(CHATS[0])
    with pytest.raises(ValueError, match="no BOS token"):
        tok.encode("hi", add_bos=True)


def test_a_lone_tokenizer_json_reads_only_that_file(tmp_path, bpe_json):
    directory = write_dir(tmp_path, "d", bpe_json, bos_in_post_processor=True, tokenizer_config=SMOLLM2_CONFIG,
                          generation_config={"eos_token_id": 2})
    path = os.path.join(directory, "tokenizer.json")
    tok, ref = load_tokenizer(path), transformers.PreTrainedTokenizerFast(tokenizer_file=path)
    assert (tok.bos_id, tok.eos_id, tok.eos_ids, tok.chat_template) == (None, None, (), None)
    assert_encodes_like(tok, ref)
    assert tok.encode_prompt("hi")[0] == 1  # the file's own post-processor still adds its BOS


def test_chat_template_file_wins_over_the_config_entry(tmp_path, bpe_json):
    template = "{% for m in messages %}[{{ m.role }}] {{ m.content }}{{ eos_token }}\n{% endfor %}"
    directory = write_dir(tmp_path, "d", bpe_json, tokenizer_config=SMOLLM2_CONFIG, chat_template=template)
    tok, ref = load_tokenizer(directory), reference(directory)
    assert tok.chat_template == template
    for messages in CHATS:
        assert tok.apply_chat_template(messages) == ref.apply_chat_template(messages, tokenize=False,
                                                                            add_generation_prompt=True)
        assert tok.encode_chat(messages) == ref.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]


def test_special_tokens_map_and_tokens_declared_outside_tokenizer_json(tmp_path, bpe_json):
    # special_tokens_map.json overrides tokenizer_config.json; a declared token that tokenizer.json holds only
    # as a vocabulary entry ("Ġcat") becomes an added special token: split out of raw text, skipped on decode.
    config = {"eos_token": "<|endoftext|>", "image_token": "Ġcat", "extra_special_tokens": ["Ġthe"]}
    special_map = {"eos_token": {"content": "<|im_end|>", "lstrip": False, "rstrip": False, "normalized": False}}
    directory = write_dir(tmp_path, "d", bpe_json, tokenizer_config=config, special_tokens_map=special_map)
    tok, ref = load_tokenizer(directory), reference(directory)
    assert tok.eos_id == ref.eos_token_id == 2
    assert tok.special_tokens == ref.special_tokens_map == {"eos_token": "<|im_end|>", "image_token": "Ġcat"}
    assert_encodes_like(tok, ref, [*TEXTS, "a Ġcat and Ġthe hat, the cat"])


def test_word_level_decode_cleans_up_spaces_as_transformers_does(tmp_path):
    words = ["[UNK]", "hello", ",", "world", ".", "is", "it", "?"]
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.decoder = tokenizers.decoders.WordPiece(cleanup=False)  # joins words with spaces, nothing more
    for clean in (True, False):
        directory = write_dir(tmp_path, f"clean{clean}", tok.to_str(),
                              tokenizer_config={"clean_up_tokenization_spaces": clean, "unk_token": "[UNK]"})
        ours, ref = load_tokenizer(directory), reference(directory)
        ids = ref("hello , world . is it ?")["input_ids"]
        assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True)
    assert ours.decode(ids) != load_tokenizer(os.path.join(tmp_path, "cleanTrue")).decode(ids)


def test_bad_tokenizer_files_raise_errors_naming_them(tmp_path, bpe_json):
    directory = write_dir(tmp_path, "json", bpe_json)
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as fh:
        fh.write("{not json")
    with pytest.raises(ValueError, match="tokenizer_config.json: cannot be read as JSON"):
        load_tokenizer(directory)
    directory = write_dir(tmp_path, "vocab", bpe_json, tokenizer_config={"eos_token": "</s>"})
    with pytest.raises(ValueError, match="eos_token '</s>'.*not in the vocabulary"):
        load_tokenizer(directory)
    directory = write_dir(tmp_path, "range", bpe_json, generation_config={"eos_token_id": [2, 400]})
    with pytest.raises(ValueError, match=r"generation_config.json: eos_token_id=400 is outside the vocabulary"):
        load_tokenizer(directory)
    directory = write_dir(tmp_path, "kind", bpe_json, config={"eos_token_id": "two"})
    with pytest.raises(ValueError, match="config.json: eos_token_id must be a non-negative token id"):
        load_tokenizer(directory)
    directory = write_dir(tmp_path, "token", bpe_json, tokenizer_config={"bos_token": {"text": "<s>"}})
    with pytest.raises(ValueError, match="bos_token: expected a token string"):
        load_tokenizer(directory)
