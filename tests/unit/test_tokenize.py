"""The prompt as the engine sees it: chat templates rendered as `transformers` renders
them, tokenized with the model's tokenizer, long prompts in cached pieces; and the
catalog that finds and loads each model's tokenizer once."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from gateway_extproc.tokenize.catalog import TokenizerCatalog
from gateway_extproc.tokenize.chat_template import ChatTemplate, ChatTemplateError
from gateway_extproc.tokenize.tokenizer import (
    ModelTokenizer,
    PromptError,
    TokenizerLoadError,
    _cut,
)

TINY = Path(__file__).resolve().parents[1] / "data" / "tiny-tokenizer"
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"


@pytest.fixture(scope="module")
def tokenizer() -> ModelTokenizer:
    return ModelTokenizer.load(TINY)


def chat_doc(*messages: tuple[str, str], **extra: object) -> dict[str, object]:
    return {"model": "m", "messages": [{"role": r, "content": c} for r, c in messages], **extra}


# -- chat templates ------------------------------------------------------------------------


def test_the_test_tokenizer_template_renders_with_bos_and_the_generation_prompt(
    tokenizer: ModelTokenizer,
) -> None:
    text = tokenizer.render_chat(chat_doc(("system", "Be brief."), ("user", "hi")))
    assert text == "<|bos|><|system|>\nBe brief.<|end|>\n<|user|>\nhi<|end|>\n<|assistant|>\n"
    without = tokenizer.render_chat(chat_doc(("user", "hi"), add_generation_prompt=False))
    assert without == "<|bos|><|user|>\nhi<|end|>\n"


def test_a_template_that_raises_is_a_prompt_error(tokenizer: ModelTokenizer) -> None:
    with pytest.raises(PromptError, match="roles must be system, user or assistant"):
        tokenizer.render_chat(chat_doc(("wizard", "hi")))


def test_trim_and_lstrip_blocks_apply_as_in_transformers() -> None:
    # A template written over several lines, as most are: the block lines leave no trace.
    template = ChatTemplate(
        "{% for m in messages %}\n    {% if m['role'] == 'user' %}\nU: {{ m['content'] }}\n"
        "    {% endif %}\n{% endfor %}\n{% if add_generation_prompt %}A:{% endif %}"
    )
    assert template.render([{"role": "user", "content": "x"}]) == "U: x\nA:"


def test_tojson_does_not_escape_html_and_keeps_key_order() -> None:
    template = ChatTemplate("{{ tools | tojson }}|{{ tools | tojson(indent=2) | length }}")
    tools = [{"name": "<b>&", "a": 1}]
    out = template.render([], tools=tools, add_generation_prompt=False)
    assert out.startswith('[{"name": "<b>&", "a": 1}]|')


def test_generation_blocks_loop_controls_and_strftime_are_available() -> None:
    template = ChatTemplate(
        "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}"
        "{% generation %}{{ m['content'] }}{% endgeneration %}{% endfor %}"
        "{{ strftime_now('%Y') | length }}"
    )
    out = template.render([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    assert out == "a4"


def test_continue_final_message_cuts_after_the_last_message() -> None:
    template = ChatTemplate(
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>{% endfor %}"
    )
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "The answer"}]
    out = template.render(messages, add_generation_prompt=False, continue_final_message=True)
    assert out == "<user>q</s><assistant>The answer"
    with pytest.raises(ChatTemplateError):
        template.render(messages, add_generation_prompt=True, continue_final_message=True)


def test_a_template_that_does_not_compile_is_refused() -> None:
    with pytest.raises(ChatTemplateError, match="does not compile"):
        ChatTemplate("{% for %}")


def test_a_sandboxed_template_cannot_reach_python_internals() -> None:
    template = ChatTemplate("{{ messages.__class__.__mro__ }}")
    with pytest.raises(ChatTemplateError):
        template.render([])


def test_text_content_parts_are_joined_as_vllm_hands_them_to_the_template(
    tokenizer: ModelTokenizer,
) -> None:
    parts = {
        "role": "user",
        "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
    }
    doc = {"model": "m", "messages": [parts]}
    assert "<|user|>\na\nb<|end|>" in tokenizer.render_chat(doc)
    image = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}
    with pytest.raises(PromptError):
        tokenizer.render_chat({"model": "m", "messages": [image]})


# -- tokenization ------------------------------------------------------------------------


def test_chat_is_encoded_without_special_tokens_and_completions_with_bos(
    tokenizer: ModelTokenizer,
) -> None:
    bos = tokenizer.encode("<|bos|>", add_special_tokens=False)
    chat_ids = tokenizer.prompt_ids(CHAT, chat_doc(("user", "hello there")))
    assert chat_ids is not None and chat_ids[: len(bos)] == bos  # from the template
    assert chat_ids[len(bos) : 2 * len(bos)] != bos  # and only once
    completion = tokenizer.prompt_ids(COMPLETIONS, {"model": "m", "prompt": "hello there"})
    assert completion == bos + tokenizer.encode("hello there", add_special_tokens=False)
    raw = tokenizer.prompt_ids(
        COMPLETIONS, {"model": "m", "prompt": "hello there", "add_special_tokens": False}
    )
    assert raw == tokenizer.encode("hello there", add_special_tokens=False)


def test_token_id_prompts_are_used_as_they_are_and_batches_of_several_are_not(
    tokenizer: ModelTokenizer,
) -> None:
    assert tokenizer.prompt_ids(COMPLETIONS, {"prompt": [5, 6, 7]}) == [5, 6, 7]
    assert tokenizer.prompt_ids(COMPLETIONS, {"prompt": [[5, 6, 7]]}) == [5, 6, 7]
    assert tokenizer.prompt_ids(COMPLETIONS, {"prompt": ["a", "b"]}) is None
    assert tokenizer.prompt_ids("/v1/embeddings", {"input": "a"}) is None


def long_text(lines: int = 3000) -> str:
    words = [
        "the",
        "quick",
        "brown",
        "fox",
        "jumps",
        "over",
        "lazy",
        "dog",
        "policy",
        "42",
        "naïve",
    ]
    return "".join(
        f"{' '.join(words[(i + j) % len(words)] for j in range(12))}{'.' if i % 3 else ''}\n"
        + ("\n" if i % 7 == 0 else "")
        + ("  indented line\n" if i % 11 == 0 else "")
        for i in range(lines)
    )


def test_pieces_encode_exactly_as_the_whole_text(tokenizer: ModelTokenizer) -> None:
    text = long_text()
    assert tokenizer.piecewise
    assert len(_cut(text, 8192)) > 10
    whole = tokenizer._tokenizer.encode(text, add_special_tokens=False).ids
    assert tokenizer.encode(text, add_special_tokens=False) == whole
    # And again, from the cache.
    assert tokenizer.encode(text, add_special_tokens=False) == whole


def test_a_tokenizer_whose_pieces_would_differ_is_encoded_whole(tmp_path: Path) -> None:
    # A sentencepiece-style tokenizer marks the start of the text: cutting it would
    # mark the start of every piece, so the self-check turns pieces off.
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    spm = Tokenizer(models.BPE(unk_token="<unk>"))
    spm.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    spm.train_from_iterator([long_text(200)], trainers.BpeTrainer(special_tokens=["<unk>"]))
    spm.save(str(tmp_path / "tokenizer.json"))
    loaded = ModelTokenizer.load(tmp_path)
    assert not loaded.piecewise
    text = long_text(400)
    assert loaded.encode(text, add_special_tokens=False) == spm.encode(text).ids


def test_reading_stops_early_and_leaves_the_rest_untokenized(tokenizer: ModelTokenizer) -> None:
    fresh = ModelTokenizer(tokenizer._tokenizer, tokenizer.chat_template)
    prompt = fresh.prompt(COMPLETIONS, {"prompt": long_text(6000)})
    assert prompt is not None
    chunks = prompt.chunks()
    first, share = next(chunks)
    assert first and 0.0 < share < 0.1
    chunks.close()
    assert len(fresh._cache) == 2  # the first group of pieces, nothing more


def test_a_reader_that_stops_midway_leaves_at_most_one_group_beyond_it_untokenized(
    tokenizer: ModelTokenizer,
) -> None:
    # Precise prefix routing reads a long prompt until no pod holds its prefix: what it
    # needed plus at most 8 pieces, not as much again (doubling groups).
    fresh = ModelTokenizer(tokenizer._tokenizer, tokenizer.chat_template)
    prompt = fresh.prompt(COMPLETIONS, {"prompt": long_text(30_000)})
    assert prompt is not None
    pieces = len(fresh.pieces(prompt.text))
    assert pieces > 40
    chunks = prompt.chunks()
    share = 0.0
    while share < 0.3:
        _, share = next(chunks)
    chunks.close()
    needed = math.ceil(0.3 * pieces)
    assert len(fresh._cache) <= needed + 8  # 64 KiB of text beyond what was needed


def test_a_directory_without_tokenizer_json_does_not_load(tmp_path: Path) -> None:
    with pytest.raises(TokenizerLoadError):
        ModelTokenizer.load(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerLoadError):
        ModelTokenizer.load(tmp_path)


def test_named_templates_and_a_chat_template_file_are_found(tmp_path: Path) -> None:
    shutil.copy(TINY / "tokenizer.json", tmp_path / "tokenizer.json")
    config = {
        "chat_template": [
            {"name": "tool_use", "template": "T"},
            {"name": "default", "template": "D"},
        ]
    }
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    assert ModelTokenizer.load(tmp_path).render_chat(chat_doc(("user", "x"))) == "D"
    (tmp_path / "chat_template.jinja").write_text("J{{ messages | length }}")
    assert ModelTokenizer.load(tmp_path).render_chat(chat_doc(("user", "x"))) == "J1"


def test_special_tokens_written_as_added_token_maps_are_read(tmp_path: Path) -> None:
    shutil.copy(TINY / "tokenizer.json", tmp_path / "tokenizer.json")
    config = {"bos_token": {"content": "<s>", "lstrip": False}, "chat_template": "{{ bos_token }}"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    assert ModelTokenizer.load(tmp_path).render_chat(chat_doc(("user", "x"))) == "<s>"


# -- the catalog -----------------------------------------------------------------------------


def test_models_find_their_directory_in_the_file_or_below_the_root(tmp_path: Path) -> None:
    shutil.copytree(TINY, tmp_path / "org" / "model-a")
    from_file: dict[str, str] = {}
    catalog = TokenizerCatalog(from_file, root=str(tmp_path))
    assert catalog.get("org/model-a") is not None
    assert catalog.get("org/model-a") is catalog.get("org/model-a")  # loaded once
    assert catalog.get("other") is None
    from_file["other"] = str(TINY)  # the models file, reloaded, names one: read live
    assert catalog.get("other") is not None


@pytest.mark.parametrize("name", ["../escape", "/etc", "a/../../b", "a\\..\\b"])
def test_model_names_cannot_leave_the_tokenizers_dir(tmp_path: Path, name: str) -> None:
    (tmp_path / "root").mkdir()
    shutil.copytree(TINY, tmp_path / "escape")
    catalog = TokenizerCatalog(root=str(tmp_path / "root"))
    assert catalog.directory_for(name) is None


def test_a_directory_that_fails_is_retried_only_after_a_while(tmp_path: Path) -> None:
    now = [0.0]
    catalog = TokenizerCatalog({"m": str(tmp_path)}, retry_after=60.0, clock=lambda: now[0])
    assert catalog.get("m") is None
    shutil.copy(TINY / "tokenizer.json", tmp_path / "tokenizer.json")
    assert catalog.get("m") is None  # not tried again yet
    now[0] = 61.0
    assert catalog.get("m") is not None
