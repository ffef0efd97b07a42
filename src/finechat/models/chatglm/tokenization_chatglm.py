"""ChatGLM-6B's tokenizer over ``ice_text.model`` (sentencepiece), as a transformers ``PreTrainedTokenizer``.

Behaviour reproduced from the reference tokenizer (whose remote code fails on transformers >= 4.34 because
it reads its vocabulary before ``super().__init__`` has run, and overrides ``_pad`` with an old signature):

- "\\n" <-> ``<n>``, "\\t" <-> ``<|tab|>``, runs of 2-80 spaces <-> ``<|blank_n|>`` (longest first);
- special tokens [MASK], [gMASK], [sMASK], <sop> (bos), <eop> (eos), <pad>, looked up by name in the
  sentencepiece model (130000, 130001, 130002, 130004, 130005 and 3 in the published one);
- ``build_inputs_with_special_tokens(a, b) = a + [gMASK, <sop>] (+ b + [<eop>])``;
- left padding. The reference's ``_pad`` also returned a 4D mask and 2D positions; here the tokenizer returns
  the ordinary 2D ``attention_mask`` and the model derives GLM's mask and positions from the ids and that
  padding mask (identical numbers, and it works with every transformers collator).

:func:`train_ice_text_model` writes a small sentencepiece model with the same piece layout, for tests and for
pretraining a GLM from scratch.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizer

from finechat.files import write_bytes_atomic

MAX_BLANK_LENGTH = 80
TAB_TOKEN = "<|tab|>"
SPECIAL_PIECES = ["[MASK]", "[gMASK]", "[sMASK]", "<unused_0>", "<sop>", "<eop>", "<ENC>", "<dBLOCK>"]


def blank_token(n: int) -> str:
    return f"<|blank_{n}|>"


def encode_whitespace(text: str, max_blank_length: int = MAX_BLANK_LENGTH) -> str:
    """Text -> the form ice_text.model was trained on (newlines, tabs and space runs as tokens)."""
    text = text.replace("\n", "<n>").replace("\t", TAB_TOKEN)
    for n in range(max_blank_length, 1, -1):
        text = text.replace(" " * n, blank_token(n))
    return text


def decode_whitespace(text: str, max_blank_length: int = MAX_BLANK_LENGTH) -> str:
    text = text.replace("<n>", "\n").replace(TAB_TOKEN, "\t")
    for n in range(2, max_blank_length + 1):
        text = text.replace(blank_token(n), " " * n)
    return text


class ChatGLMTokenizer(PreTrainedTokenizer):
    """ChatGLM-6B's tokenizer: sentencepiece ``ice_text.model`` plus ChatGLM's whitespace and special tokens."""

    vocab_files_names = {"vocab_file": "ice_text.model"}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(
        self,
        vocab_file: str,
        do_lower_case: bool = False,
        remove_space: bool = False,
        bos_token: str = "<sop>",
        eos_token: str = "<eop>",
        end_token: str = "</s>",
        mask_token: str = "[MASK]",
        gmask_token: str = "[gMASK]",
        smask_token: str = "[sMASK]",
        pad_token: str = "<pad>",
        unk_token: str = "<unk>",
        padding_side: str = "left",
        num_image_tokens: int = 0,
        max_blank_length: int = MAX_BLANK_LENGTH,
        **kwargs: Any,
    ) -> None:
        import sentencepiece as spm

        # The vocabulary must exist before PreTrainedTokenizer.__init__, which looks tokens up.
        self.vocab_file = vocab_file
        self.sp = spm.SentencePieceProcessor(model_file=str(vocab_file))
        self.num_image_tokens = num_image_tokens  # older ice_text models put 20000 image ids first
        self.max_blank_length = max_blank_length
        self.do_lower_case, self.remove_space = do_lower_case, remove_space
        self.end_token, self.gmask_token, self.smask_token = end_token, gmask_token, smask_token
        kwargs.pop("eop_token", None)  # the published tokenizer_config.json has eop_token == eos_token
        kwargs.pop("additional_special_tokens", None)
        kwargs.pop("extra_special_tokens", None)
        super().__init__(
            bos_token=bos_token, eos_token=eos_token, mask_token=mask_token, pad_token=pad_token,
            unk_token=unk_token, padding_side=padding_side, do_lower_case=do_lower_case, remove_space=remove_space,
            num_image_tokens=num_image_tokens, max_blank_length=max_blank_length,
            extra_special_tokens=[gmask_token, smask_token], **kwargs,
        )

    # -- vocabulary ----------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.num_image_tokens + self.sp.get_piece_size()

    def get_vocab(self) -> dict[str, int]:
        vocab = {self._convert_id_to_token(i): i for i in range(self.vocab_size)}
        vocab.update(self.added_tokens_encoder)
        return vocab

    def _convert_token_to_id(self, token: str) -> int:
        if token.startswith("<image_") and token.endswith(">") and token[7:-1].isdigit():
            return int(token[7:-1])
        return self.sp.piece_to_id(token) + self.num_image_tokens

    def _convert_id_to_token(self, index: int) -> str:
        if index < self.num_image_tokens:
            return f"<image_{index}>"
        return self.sp.id_to_piece(index - self.num_image_tokens)

    def _special_id(self, token: str) -> int:
        index = self._convert_token_to_id(token)
        if index == self.sp.unk_id() + self.num_image_tokens and token != self.unk_token:
            raise ValueError(f"{self.vocab_file}: the vocabulary has no {token} piece")
        return index

    @property
    def gmask_token_id(self) -> int:
        return self._special_id(self.gmask_token)

    @property
    def smask_token_id(self) -> int:
        return self._special_id(self.smask_token)

    # -- text <-> tokens -----------------------------------------------------------------------------
    def _tokenize(self, text: str, **kwargs: Any) -> list[str]:
        if self.remove_space:
            text = " ".join(text.strip().split())
        if self.do_lower_case:
            text = text.lower()
        return self.sp.encode(encode_whitespace(text, self.max_blank_length), out_type=str)

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        # sentencepiece drops control pieces such as <sop>; keep special tokens as their text
        special = set(self.all_special_tokens)
        out, run = [], []
        for token in tokens:
            if token in special:
                if run:
                    out.append(self.sp.decode_pieces(run))
                    run = []
                out.append(token)
            else:
                run.append(token)
        if run:
            out.append(self.sp.decode_pieces(run))
        return decode_whitespace("".join(out), self.max_blank_length)

    def build_inputs_with_special_tokens(self, token_ids_0: list[int], token_ids_1: list[int] | None = None) -> list[int]:
        """``a + [gMASK, <sop>]``, and ``+ b + [<eop>]`` for a pair (prompt, answer)."""
        ids = list(token_ids_0) + [self.gmask_token_id, self.bos_token_id]
        if token_ids_1 is not None:
            ids += list(token_ids_1) + [self.eos_token_id]
        return ids

    def get_special_tokens_mask(self, token_ids_0: list[int], token_ids_1: list[int] | None = None,
                                already_has_special_tokens: bool = False) -> list[int]:
        if already_has_special_tokens:
            return super().get_special_tokens_mask(token_ids_0, token_ids_1, already_has_special_tokens=True)
        mask = [0] * len(token_ids_0) + [1, 1]
        if token_ids_1 is not None:
            mask += [0] * len(token_ids_1) + [1]
        return mask

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str]:
        name = (filename_prefix + "-" if filename_prefix else "") + self.vocab_files_names["vocab_file"]
        out = os.path.join(save_directory, name) if os.path.isdir(save_directory) else save_directory
        if os.path.abspath(self.vocab_file) != os.path.abspath(out):
            shutil.copyfile(self.vocab_file, out)
        return (out,)


def train_ice_text_model(texts: list[str], model_file: str | Path, vocab_size: int | None = None) -> Path:
    """Train a small BPE sentencepiece model laid out like ChatGLM-6B's ice_text.model.

    Pieces: <unk> <s> </s> <pad> <n>, the learned pieces, [MASK] [gMASK] [sMASK] <unused_0> <sop> <eop> <ENC>
    <dBLOCK>, <|tab|>, <|blank_2|> ... <|blank_80|>, then the 256 byte pieces (byte fallback), in that order,
    as in the published model (where [MASK] is 130000). ``vocab_size`` counts the trained part (default:
    256 + 3 + distinct characters + 64, the smallest size sentencepiece accepts plus some merges).
    """
    import io

    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as pb

    lines = [encode_whitespace(t) for t in texts if t.strip()]
    chars = {c for line in lines for c in line}
    size = vocab_size or 256 + 3 + len(chars) + 64
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=buffer, vocab_size=size, model_type="bpe", byte_fallback=True,
        character_coverage=1.0, pad_id=3, pad_piece="<pad>", user_defined_symbols=["<n>"],
        split_digits=True, max_sentence_length=1 << 16, minloglevel=2, hard_vocab_limit=False,
    )
    proto = pb.ModelProto()
    proto.ParseFromString(buffer.getvalue())
    piece = pb.ModelProto.SentencePiece
    by_type: dict[int, list] = {}
    for p in proto.pieces:
        by_type.setdefault(p.type, []).append(p)
    head = [p for p in proto.pieces if p.piece in ("<unk>", "<s>", "</s>", "<pad>", "<n>")]
    normal = by_type.get(piece.NORMAL, [])
    byte_pieces = sorted(by_type.get(piece.BYTE, []), key=lambda p: p.piece)
    tail = [piece(piece=t, score=0.0, type=piece.CONTROL) for t in SPECIAL_PIECES]
    tail += [piece(piece=t, score=0.0, type=piece.USER_DEFINED)
             for t in [TAB_TOKEN] + [blank_token(n) for n in range(2, MAX_BLANK_LENGTH + 1)]]
    ordered = [_copy_piece(p) for p in head + normal] + tail + [_copy_piece(p) for p in byte_pieces]
    del proto.pieces[:]
    proto.pieces.extend(ordered)
    out = Path(model_file)
    write_bytes_atomic(out, proto.SerializeToString())
    return out


def _copy_piece(p):
    from sentencepiece import sentencepiece_model_pb2 as pb

    return pb.ModelProto.SentencePiece(piece=p.piece, score=p.score, type=p.type)
