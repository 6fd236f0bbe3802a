"""Build the small tokenizer the tests, the demo and the simulator use: `tiny-tokenizer/`.

A byte-level BPE (the kind Llama 3, Qwen and GPT models ship) trained here with the
`tokenizers` library on generated text, so nothing is downloaded and the files are small
enough to commit. The directory has what a Hugging Face model repository has for its
tokenizer: `tokenizer.json` (the tokenizer), and `tokenizer_config.json` with the special
tokens and a chat template in the usual Jinja dialect (bos_token, add_generation_prompt,
raise_exception for a role it does not know).

    python tests/data/make_tokenizer.py   # rewrites tests/data/tiny-tokenizer/

Training is deterministic for a given `tokenizers` version and corpus.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

OUT = Path(__file__).resolve().parent / "tiny-tokenizer"
VOCAB_SIZE = 2048
BOS, EOS = "<|bos|>", "<|eos|>"
ROLES = ("system", "user", "assistant")
SPECIAL = [BOS, EOS, "<|end|>", *(f"<|{role}|>" for role in ROLES)]

# Words of the simulator's replies and of the tests' prompts, plus filler: what the
# tokenizer sees most should become single tokens, as common words do in real ones.
_WORDS_TEXT = """
the quick brown fox jumps over lazy dog a simulated engine answers every request with
tokens paced by its clock while gateway routes traffic between pods that share nothing
but prefix cache of blocks kept warm repeated prompts and long conversations about
queues latency batches adapters models metrics faults you are helpful assistant system
prompt document policy customer support question answer please explain summarise the
following text in one sentence translate into french code review tenant user session
"""
WORDS = _WORDS_TEXT.split()

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('Conversation roles must be system, user or assistant, not '"
    " + message['role']) }}"
    "{% endif %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def corpus(lines: int = 20_000, seed: int = 13) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(lines):
        words = [rng.choice(WORDS) for _ in range(rng.randint(3, 20))]
        if rng.random() < 0.3:
            words.append(str(rng.randint(0, 99_999)))
        if rng.random() < 0.2:
            words.append("".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(6)))
        out.append(" ".join(words) + rng.choice([".", "?", "!", ",", ":"]))
    return out


def build() -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus(), trainer=trainer)
    # Completions prompts get the BOS token (add_special_tokens=True); chat prompts carry
    # it in the template and are encoded without it, as engines do.
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A",
        pair=f"{BOS} $A {BOS} $B",
        special_tokens=[(BOS, tokenizer.token_to_id(BOS))],
    )
    return tokenizer


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    build().save(str(OUT / "tokenizer.json"))
    config = {
        "bos_token": BOS,
        "eos_token": EOS,
        "add_bos_token": True,
        "model_max_length": 131072,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": CHAT_TEMPLATE,
    }
    (OUT / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
