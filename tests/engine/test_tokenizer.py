from __future__ import annotations

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from tokenizers.processors import TemplateProcessing

from csm_voice_api.engine.tokenizer import BOS, EOS, TextTokenizer, build_tiny_tokenizer


def test_turn_is_speaker_tagged_and_wrapped(tiny_tokenizer):
    ids = tiny_tokenizer.encode_turn(3, "Hello there.")
    assert ids[0] == tiny_tokenizer.bos_id and ids[-1] == tiny_tokenizer.eos_id
    assert tiny_tokenizer.tokenizer.id_to_token(ids[0]) == BOS
    assert tiny_tokenizer.tokenizer.id_to_token(ids[-1]) == EOS
    bare = tiny_tokenizer.tokenizer.encode("[3]Hello there.", add_special_tokens=False).ids
    assert ids[1:-1] == bare
    assert tiny_tokenizer.decode(ids) == "[3]Hello there."


def test_matches_sesame_template_via_transformers(tiny_tokenizer):
    """Sesame's load_llama3_tokenizer: AutoTokenizer with its post-processor replaced by BOS $A EOS."""
    from transformers import PreTrainedTokenizerFast

    ref = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(tiny_tokenizer.tokenizer.to_str()),
                                  bos_token=BOS, eos_token=EOS)
    ref._tokenizer.post_processor = TemplateProcessing(
        single=f"{ref.bos_token}:0 $A:0 {ref.eos_token}:0",
        pair=f"{ref.bos_token}:0 $A:0 {ref.eos_token}:0 {ref.bos_token}:1 $B:1 {ref.eos_token}:1",
        special_tokens=[(ref.bos_token, ref.bos_token_id), (ref.eos_token, ref.eos_token_id)],
    )
    for speaker, text in [(0, "Hello!"), (1, "  spaces  and ünïcode 🙂"), (7, ""), (0, "[1] nested tags")]:
        assert tiny_tokenizer.encode_turn(speaker, text) == ref.encode(f"[{speaker}]{text}")


def test_replaces_a_bos_only_post_processor():
    """Llama-3's own tokenizer.json only prepends BOS; CSM needs EOS too, whatever the file says."""
    base = build_tiny_tokenizer().tokenizer
    bos = base.token_to_id(BOS)
    base.post_processor = TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, bos)])
    assert base.encode("[0]hi").ids[-1] != base.token_to_id(EOS)
    wrapped = TextTokenizer(Tokenizer.from_str(base.to_str()))
    assert wrapped.encode_turn(0, "hi")[-1] == wrapped.eos_id


def test_from_file_round_trip(tmp_path, tiny_tokenizer):
    path = tmp_path / "tokenizer.json"
    tiny_tokenizer.tokenizer.save(str(path))
    loaded = TextTokenizer.from_file(path)
    assert loaded.encode_turn(1, "Good morning") == tiny_tokenizer.encode_turn(1, "Good morning")
    assert loaded.vocab_size == tiny_tokenizer.vocab_size


def test_tiny_tokenizer_is_small_and_deterministic(tiny_tokenizer):
    assert tiny_tokenizer.vocab_size <= 512
    assert build_tiny_tokenizer().tokenizer.to_str() == tiny_tokenizer.tokenizer.to_str()
    # common words merge into few tokens, so prompts have realistic lengths
    text = "How are you today?"
    assert len(tiny_tokenizer.tokenizer.encode(text, add_special_tokens=False).ids) <= len(text) // 3


def test_rejects_tokenizer_without_llama3_specials():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    with pytest.raises(ValueError, match="begin_of_text"):
        TextTokenizer(tok)
