"""The text side of CSM: the Llama-3 tokenizer with Sesame's BOS/EOS wrapping.

Sesame's generator replaces the tokenizer's post-processor with a template that puts
`<|begin_of_text|>` before and `<|end_of_text|>` after every encoded turn; the model was
trained on that framing, so TextTokenizer installs the same template whatever the file says.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tokenizers.processors import TemplateProcessing

BOS = "<|begin_of_text|>"
EOS = "<|end_of_text|>"


def csm_post_processor(bos_id: int, eos_id: int) -> TemplateProcessing:
    """The template of Sesame's load_llama3_tokenizer: `BOS $A EOS` (and the same around $B)."""
    return TemplateProcessing(
        single=f"{BOS}:0 $A:0 {EOS}:0",
        pair=f"{BOS}:0 $A:0 {EOS}:0 {BOS}:1 $B:1 {EOS}:1",
        special_tokens=[(BOS, bos_id), (EOS, eos_id)],
    )


class TextTokenizer:
    """A `tokenizers.Tokenizer` that encodes one speaker turn the way CSM was trained on."""

    def __init__(self, tokenizer: Tokenizer):
        bos_id, eos_id = tokenizer.token_to_id(BOS), tokenizer.token_to_id(EOS)
        if bos_id is None or eos_id is None:
            raise ValueError(f"tokenizer has no {BOS} / {EOS} token: not a Llama-3 tokenizer")
        tokenizer.post_processor = csm_post_processor(bos_id, eos_id)
        self.tokenizer = tokenizer
        self.bos_id, self.eos_id = bos_id, eos_id

    @classmethod
    def from_file(cls, path: str | Path) -> TextTokenizer:
        return cls(Tokenizer.from_file(str(path)))

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode_turn(self, speaker: int, text: str) -> list[int]:
        """Token ids of `[speaker]text`, wrapped in BOS ... EOS."""
        return self.tokenizer.encode(f"[{speaker}]{text}").ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


# A few paragraphs of plain English: enough for a byte-level BPE to learn common words, so
# demo prompts tokenize into realistic lengths. Changing this text changes the demo model.
_CORPUS = """\
Hello, and welcome. This is a small demonstration voice with random weights.
It speaks noise, not words, but every part of the server runs for real.
The quick brown fox jumps over the lazy dog. How are you today? I am fine, thank you.
We are going to talk about the weather, the news, and what happened in the world this week.
Please wait a moment while I think about that. Yes, of course. No, not really.
One, two, three, four, five, six, seven, eight, nine, ten. It is twenty past nine.
Speaker zero said hello to speaker one, and speaker one answered with a question.
[0] Good morning! [1] Good morning to you too. [0] Shall we begin? [1] Let's start.
Could you tell me the way to the station? Turn left at the corner and walk straight ahead.
The conversation continued for a while, and then everyone went home for the evening.
I would like a cup of tea, please. Would you like some coffee instead? That sounds great.
"""


def build_tiny_tokenizer(vocab_size: int = 512) -> TextTokenizer:
    """A deterministic byte-level BPE (<= 512 tokens) with Llama-3's BOS/EOS, for the demo model and tests."""
    if vocab_size > 512:
        raise ValueError("the tiny tokenizer is capped at 512 tokens")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS.splitlines(), trainer=trainer)
    return TextTokenizer(tok)
