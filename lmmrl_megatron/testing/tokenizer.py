"""A small byte-level BPE tokenizer with Qwen's special tokens, trained locally.

Real Qwen tokenizers cannot be downloaded here, so the tiny checkpoints carry one built from scratch with the
same pre-tokenisation (byte level, Qwen's split regex) and the same special tokens, so every code path that looks
up `<|image_pad|>` or `<|im_end|>` by name behaves as it would on a real checkpoint.
"""

from __future__ import annotations

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

# Qwen2's pre-tokenisation regex: contractions, letter runs, single digits, punctuation runs, newlines, spaces.
QWEN_SPLIT_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# The order matters only in that `<|endoftext|>` comes first, as in Qwen; the ids follow the learned vocabulary.
QWEN_VL_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

# Text the BPE merges are learned from: chat scaffolding, reasoning tags and the words of the synthetic tasks, so
# that typical prompts and answers encode into a few tokens each.
_TRAINING_TEXT = """
system user assistant You are a helpful assistant.
<think> </think> <answer> </answer> \\boxed{ } The answer is
How many shapes are in the image? How many circles squares triangles are there? Count the objects.
What color is the shape? red green blue yellow black white purple orange circle square triangle star
Answer with a single number. Answer with one word. Put your final answer within \\boxed{}.
Let me think step by step. First, I look at the image. I see one two three four five six.
0 1 2 3 4 5 6 7 8 9 10 + - * / = ( ) [ ] , . ? ! : ; ' " \\frac{1}{2} x y z
"""


def build_qwen_like_tokenizer(vocab_size: int = 480) -> Tokenizer:
    """Train a byte-level BPE of about `vocab_size` tokens (special tokens included) with Qwen's specials."""
    tokenizer = Tokenizer(models.BPE(unk_token=None, continuing_subword_prefix="", end_of_word_suffix=""))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_SPLIT_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=list(QWEN_VL_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Repeating the text makes merge frequencies large enough to be learned deterministically.
    tokenizer.train_from_iterator([_TRAINING_TEXT] * 8, trainer=trainer)
    return tokenizer
