"""fairseq's Transformer for translation (`transformer_iwslt_de_en`) in plain PyTorch.

Same computation, parameter names and initialisation as fairseq's `TransformerModel` with
`--arch transformer_iwslt_de_en --share-decoder-input-output-embed`:

- encoder and decoder: token embedding (normal(0, d^-1/2), `<pad>` row zero) scaled by sqrt(d), plus
  fairseq's `SinusoidalPositionalEmbedding` (positions start at padding_idx + 1 and skip pads; no
  parameters), then dropout; the encoder zeroes its padded positions as fairseq does;
- post-norm layers (`normalize_before=False`, so no final layer norm and no embedding layer norm):
  encoder = self-attention, FFN; decoder = causal self-attention, encoder attention, FFN; each sub-layer
  is dropout(sublayer(x)) + x followed by LayerNorm; FFN = fc2(dropout_act(relu(fc1(x))));
- multi-head attention with `q_proj`, `k_proj`, `v_proj`, `out_proj` (with biases; q/k/v xavier-uniform
  with gain 1/sqrt(2), out_proj xavier-uniform with zero bias, as fairseq's MultiheadAttention), scaled by
  head_dim^-1/2, attention dropout 0 and activation dropout 0 (fairseq's defaults);
- the decoder's output projection is its input embedding matrix (`share_decoder_input_output_embed`):
  one parameter, `decoder.embed_tokens.weight`; the encoder has its own embedding.

Parameter names follow PyTorch's `.weight` / `.bias` convention (ASAM scales parameters whose name
contains "weight": all matrices, embeddings and LayerNorm gains, as in fairseq).

Tensors are batch-first. `forward(src_tokens, src_lengths, prev_output_tokens) -> logits (B, T, V)`.
Incremental decoding (`decoder(..., state=DecoderState)`) runs one target step at a time with cached
self-attention keys/values and encoder keys/values computed once; it matches the parallel decoder.

No host syncs in forward (training or incremental): the position table is sized once for `max_positions`,
positions are computed on the device, and the source padding mask is always passed (never `mask.any()`).
Only shapes and Python ints (the decoding step) steer the control flow.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

PAD = 1


@dataclass(frozen=True)
class TransformerConfig:
    encoder_layers: int = 6
    decoder_layers: int = 6
    embed_dim: int = 512
    ffn_dim: int = 1024
    heads: int = 4
    dropout: float = 0.3
    attention_dropout: float = 0.0
    activation_dropout: float = 0.0
    max_positions: int = 1024  # fairseq's max_source_positions / max_target_positions


CONFIGS: dict[str, TransformerConfig] = {
    # fairseq transformer_iwslt_de_en: 6+6 layers, d 512, FFN 1024, 4 heads, dropout 0.3
    "transformer": TransformerConfig(),
    # for tests and CPU smoke runs
    "transformer_tiny": TransformerConfig(encoder_layers=2, decoder_layers=2, embed_dim=64, ffn_dim=128, heads=4,
                                          dropout=0.1),
}


def sinusoidal_table(num_embeddings: int, dim: int, padding_idx: int | None) -> torch.Tensor:
    """fairseq's SinusoidalPositionalEmbedding.get_embedding: [sin | cos], row padding_idx zero."""
    half = dim // 2
    scale = math.log(10000) / (half - 1)
    freqs = torch.exp(torch.arange(half, dtype=torch.float) * -scale)
    args = torch.arange(num_embeddings, dtype=torch.float).unsqueeze(1) * freqs.unsqueeze(0)
    table = torch.cat([torch.sin(args), torch.cos(args)], dim=1).view(num_embeddings, -1)
    if dim % 2 == 1:
        table = torch.cat([table, torch.zeros(num_embeddings, 1)], dim=1)
    if padding_idx is not None:
        table[padding_idx, :] = 0
    return table


def make_positions(tokens: torch.Tensor, padding_idx: int) -> torch.Tensor:
    """fairseq's utils.make_positions: non-pad tokens numbered padding_idx + 1, ...; pads get padding_idx."""
    mask = tokens.ne(padding_idx).int()
    return (torch.cumsum(mask, dim=1).type_as(mask) * mask).long() + padding_idx


class SinusoidalPositionalEmbedding(nn.Module):
    """No parameters: a table (non-persistent buffer, so not in the state dict) sized once, at construction,
    for sequences of up to `max_positions` tokens (rows 0 .. padding_idx + max_positions).

    fairseq grows its table on demand; a fixed table keeps forward free of host syncs (no
    `int(positions.max())`) and of re-allocation. A longer input is refused from its shape alone."""

    def __init__(self, dim: int, padding_idx: int, max_positions: int = 1024):
        super().__init__()
        self.dim, self.padding_idx, self.max_positions = dim, padding_idx, max_positions
        self.register_buffer("table", sinusoidal_table(max_positions + padding_idx + 1, dim, padding_idx),
                             persistent=False)

    def _check(self, length: int) -> None:
        if length > self.max_positions:
            raise ValueError(f"sequence of {length} tokens: the model takes at most {self.max_positions}")

    def forward(self, tokens: torch.Tensor, step: int | None = None) -> torch.Tensor:
        """(B, T) tokens -> (B, T, dim); with `step` (incremental decoding) the position of that step.
        Positions are computed on the device (`make_positions`): pads get row padding_idx (zeros)."""
        if step is not None:
            self._check(step + 1)
            return self.table[self.padding_idx + 1 + step].expand(tokens.size(0), 1, -1)
        self._check(tokens.size(1))
        return self.table[make_positions(tokens, self.padding_idx)]


def Embedding(num: int, dim: int, padding_idx: int) -> nn.Embedding:
    m = nn.Embedding(num, dim, padding_idx=padding_idx)
    nn.init.normal_(m.weight, mean=0, std=dim ** -0.5)
    nn.init.constant_(m.weight[padding_idx], 0)
    return m


def Linear(in_features: int, out_features: int, bias: bool = True) -> nn.Linear:
    m = nn.Linear(in_features, out_features, bias)
    nn.init.xavier_uniform_(m.weight)
    if bias:
        nn.init.constant_(m.bias, 0.0)
    return m


class MultiheadAttention(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float = 0.0):
        super().__init__()
        assert dim % heads == 0
        self.dim, self.heads, self.head_dim, self.dropout = dim, heads, dim // heads, dropout
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.q_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)
        # fairseq MultiheadAttention.reset_parameters (q/k/v biases keep nn.Linear's default init)
        gain = 1 / math.sqrt(2)
        for proj in (self.k_proj, self.v_proj, self.q_proj):
            nn.init.xavier_uniform_(proj.weight, gain=gain)
        nn.init.xavier_uniform_(self.out_proj.weight)
        nn.init.constant_(self.out_proj.bias, 0.0)

    def _split(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, C) -> (B, H, T, dh)
        return x.view(x.size(0), x.size(1), self.heads, self.head_dim).transpose(1, 2)

    def forward(self, query: torch.Tensor, key: torch.Tensor | None, key_padding_mask: torch.Tensor | None = None,
                causal: bool = False, cache: dict[str, torch.Tensor] | None = None,
                static_kv: bool = False) -> torch.Tensor:
        """query (B, Tq, C); key = value (B, Tk, C); key_padding_mask (B, Tk) True at pads.
        cache: incremental state of this attention; static_kv: keys are the encoder output (computed once).

        The mask is a boolean `attn_mask` (no -inf fill of our own). A row with every key masked would be
        undefined, but a real source always holds its `</s>`, so every query, a padded one included, has a
        key to attend to and stays finite."""
        q = self._split(self.q_proj(query))
        if cache is not None and static_kv and "k" in cache:
            k, v = cache["k"], cache["v"]
        else:
            k, v = self._split(self.k_proj(key)), self._split(self.v_proj(key))
            if cache is not None:
                if not static_kv and "k" in cache:
                    k = torch.cat([cache["k"], k], dim=2)
                    v = torch.cat([cache["v"], v], dim=2)
                cache["k"], cache["v"] = k, v
        mask = None
        if key_padding_mask is not None:
            mask = ~key_padding_mask[:, None, None, :]  # True = attend
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                             dropout_p=self.dropout if self.training else 0.0,
                                             is_causal=causal and mask is None, scale=self.head_dim ** -0.5)
        out = out.transpose(1, 2).reshape(query.size(0), query.size(1), self.dim)
        return self.out_proj(out)


class EncoderLayer(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        d = cfg.embed_dim
        self.self_attn = MultiheadAttention(d, cfg.heads, cfg.attention_dropout)
        self.self_attn_layer_norm = nn.LayerNorm(d)
        self.fc1 = Linear(d, cfg.ffn_dim)
        self.fc2 = Linear(cfg.ffn_dim, d)
        self.final_layer_norm = nn.LayerNorm(d)
        self.dropout = nn.Dropout(cfg.dropout)
        self.activation_dropout = nn.Dropout(cfg.activation_dropout)

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor | None) -> torch.Tensor:
        x = self.self_attn_layer_norm(x + self.dropout(self.self_attn(x, x, key_padding_mask=padding_mask)))
        h = self.fc2(self.activation_dropout(F.relu(self.fc1(x))))
        return self.final_layer_norm(x + self.dropout(h))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        d = cfg.embed_dim
        self.self_attn = MultiheadAttention(d, cfg.heads, cfg.attention_dropout)
        self.self_attn_layer_norm = nn.LayerNorm(d)
        self.encoder_attn = MultiheadAttention(d, cfg.heads, cfg.attention_dropout)
        self.encoder_attn_layer_norm = nn.LayerNorm(d)
        self.fc1 = Linear(d, cfg.ffn_dim)
        self.fc2 = Linear(cfg.ffn_dim, d)
        self.final_layer_norm = nn.LayerNorm(d)
        self.dropout = nn.Dropout(cfg.dropout)
        self.activation_dropout = nn.Dropout(cfg.activation_dropout)

    def forward(self, x: torch.Tensor, enc: torch.Tensor, enc_padding_mask: torch.Tensor | None,
                cache: dict[str, Any] | None = None) -> torch.Tensor:
        # Right-padded targets: the causal mask alone keeps every real position away from the pads.
        self_cache = cache.setdefault("self", {}) if cache is not None else None
        enc_cache = cache.setdefault("enc", {}) if cache is not None else None
        h = self.self_attn(x, x, causal=cache is None, cache=self_cache)
        x = self.self_attn_layer_norm(x + self.dropout(h))
        h = self.encoder_attn(x, enc, key_padding_mask=enc_padding_mask, cache=enc_cache, static_kv=True)
        x = self.encoder_attn_layer_norm(x + self.dropout(h))
        h = self.fc2(self.activation_dropout(F.relu(self.fc1(x))))
        return self.final_layer_norm(x + self.dropout(h))


class Encoder(nn.Module):
    def __init__(self, cfg: TransformerConfig, vocab: int, padding_idx: int = PAD):
        super().__init__()
        self.padding_idx = padding_idx
        self.embed_scale = math.sqrt(cfg.embed_dim)
        self.embed_tokens = Embedding(vocab, cfg.embed_dim, padding_idx)
        self.embed_positions = SinusoidalPositionalEmbedding(cfg.embed_dim, padding_idx, cfg.max_positions)
        self.dropout = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.encoder_layers))

    def forward(self, src_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> encoder output (B, S, C), padding mask (B, S) True at pads.

        The mask is always built and passed, also when the batch has no pads: asking (`mask.any()`) would
        be a host sync in every forward, and an all-False mask changes nothing (zeroing multiplies by 1)."""
        padding_mask = src_tokens.eq(self.padding_idx)
        x = self.embed_scale * self.embed_tokens(src_tokens) + self.embed_positions(src_tokens)
        x = self.dropout(x)
        x = x * (1 - padding_mask.unsqueeze(-1).type_as(x))
        for layer in self.layers:
            x = layer(x, padding_mask)
        return x, padding_mask


class DecoderState:
    """Incremental decoding state: per-layer key/value caches, the encoder output, and the step."""

    def __init__(self, enc: torch.Tensor, enc_padding_mask: torch.Tensor | None, num_layers: int):
        self.enc, self.enc_padding_mask = enc, enc_padding_mask
        self.layers: list[dict[str, Any]] = [{} for _ in range(num_layers)]
        self.step = 0

    def reorder(self, order: torch.Tensor) -> None:
        """Keep / duplicate rows (beam search): row i of the new state is row order[i] of the old."""
        self.enc = self.enc.index_select(0, order)
        if self.enc_padding_mask is not None:
            self.enc_padding_mask = self.enc_padding_mask.index_select(0, order)
        for layer in self.layers:
            for cache in layer.values():
                for key in cache:
                    cache[key] = cache[key].index_select(0, order)


class Decoder(nn.Module):
    def __init__(self, cfg: TransformerConfig, vocab: int, padding_idx: int = PAD):
        super().__init__()
        self.padding_idx = padding_idx
        self.embed_scale = math.sqrt(cfg.embed_dim)
        self.embed_tokens = Embedding(vocab, cfg.embed_dim, padding_idx)  # also the output projection
        self.embed_positions = SinusoidalPositionalEmbedding(cfg.embed_dim, padding_idx, cfg.max_positions)
        self.dropout = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.decoder_layers))

    def forward(self, prev_output_tokens: torch.Tensor, enc: torch.Tensor | None = None,
                enc_padding_mask: torch.Tensor | None = None, state: DecoderState | None = None) -> torch.Tensor:
        """Teacher forcing: prev_output_tokens (B, T) -> logits (B, T, V).
        Incremental (state given): prev_output_tokens (B, 1) is the token of step state.step; advances it."""
        if state is not None:
            enc, enc_padding_mask = state.enc, state.enc_padding_mask
            pos = self.embed_positions(prev_output_tokens, step=state.step)
        else:
            pos = self.embed_positions(prev_output_tokens)
        x = self.dropout(self.embed_scale * self.embed_tokens(prev_output_tokens) + pos)
        for i, layer in enumerate(self.layers):
            x = layer(x, enc, enc_padding_mask, cache=state.layers[i] if state is not None else None)
        if state is not None:
            state.step += 1
        return F.linear(x, self.embed_tokens.weight)


class TransformerModel(nn.Module):
    def __init__(self, cfg: TransformerConfig, src_vocab: int, tgt_vocab: int, padding_idx: int = PAD):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg, src_vocab, padding_idx)
        self.decoder = Decoder(cfg, tgt_vocab, padding_idx)

    def forward(self, src_tokens: torch.Tensor, src_lengths: torch.Tensor | None,
                prev_output_tokens: torch.Tensor) -> torch.Tensor:
        enc, mask = self.encoder(src_tokens)
        return self.decoder(prev_output_tokens, enc, mask)

    def start_decoding(self, src_tokens: torch.Tensor) -> DecoderState:
        enc, mask = self.encoder(src_tokens)
        return DecoderState(enc, mask, len(self.decoder.layers))

    def decode_step(self, tokens: torch.Tensor, state: DecoderState) -> torch.Tensor:
        """tokens (B,) of the current step -> logits (B, V) of the next token."""
        return self.decoder(tokens.unsqueeze(1), state=state)[:, 0]

    def max_positions(self) -> int:
        return self.cfg.max_positions


def create_transformer(name: str, src_vocab: int, tgt_vocab: int, padding_idx: int = PAD,
                       **overrides: Any) -> TransformerModel:
    """A named configuration (`transformer`, `transformer_tiny`), fields overridable (layers, dims, dropout)."""
    if name not in CONFIGS:
        raise KeyError(f"unknown translation model {name!r}; choose one of: {', '.join(CONFIGS)}")
    return TransformerModel(replace(CONFIGS[name], **overrides), src_vocab, tgt_vocab, padding_idx)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # shared tensors counted once, as fairseq prints
