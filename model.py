"""
The unified multimodal model (UMM): a thin adapter over transformers' JanusForConditionalGeneration.

Janus anatomy, as the rest of UniGame sees it through the verbs below:
  understanding  pixels -> SigLIP vision_model -> aligner -> image embeds spliced into the prompt
                 -> LLaMA language_model -> lm_head -> answer tokens
  generation     prompt -> language_model -> generation_head -> VQ codes; each code re-enters the LM
                 through generation_embeddings -> generation_aligner
  vqmodel        VQ encoder -> codebook-space tokens z -> nearest codebook entry -> VQ decoder

train.py and eval.py call only the methods of UMM and the LoRA functions; nothing else reaches into
Janus. The same code serves a real Janus-Pro-1B / 7B directory in Hugging Face format and our tiny
checkpoint for the built-in world (assets/shapes-base), whose tokenizer carries Janus-Pro's special
tokens so that prompts are laid out identically.
"""

import json
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import (AutoTokenizer, DynamicCache, JanusConfig, JanusForConditionalGeneration,
                          JanusVisionConfig, JanusVQVAEConfig, LlamaConfig, PreTrainedTokenizerFast, StaticCache)
from transformers.utils import logging as hf_logging

from perturber import Perturber, input_gradient

# Janus-Pro's special tokens, spelled exactly as in its tokenizer.
PAD, BOS, EOS = "<｜▁pad▁｜>", "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
IMAGE, BOI, EOI = "<image_placeholder>", "<begin_of_image>", "<end_of_image>"
USER, ASSISTANT = "<|User|>", "<|Assistant|>"
SPECIAL_TOKENS = [PAD, BOS, EOS, IMAGE, BOI, EOI, USER, ASSISTANT]

# The system prompt transformers' JanusProcessor prepends to understanding prompts when its
# processor_config.json says use_default_system_prompt (as the converted Janus-Pro checkpoints do).
JANUS_SYSTEM_PROMPT = (
    "You are a helpful language and vision assistant. "
    "You are able to understand the visual content that the user provides, "
    "and assist the user with a variety of tasks using natural language.\n\n")


# -----------------------------------------------------------------------------------------------
# Tokenizer and tiny configuration for the built-in world

def build_tokenizer(corpus, vocab_size=512):
    """A byte-level BPE tokenizer trained on `corpus` (an iterable of strings) with Janus-Pro's
    special tokens; byte-level so any text encodes without unknown tokens and decodes exactly."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    # like Janus-Pro's LLaMA tokenizer: BOS is prepended to every encoded text
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, tok.token_to_id(BOS))])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
        extra_special_tokens={"image_token": IMAGE, "boi_token": BOI, "eoi_token": EOI})


def tiny_config(tokenizer, image_size=32, patch_size=4, lm_width=256, lm_layers=4, lm_heads=4,
                vision_width=128, vision_layers=2, codebook_size=512, codebook_dim=8):
    """A few-million-parameter Janus with Janus-Pro's layout. The SigLIP patch grid equals the VQ
    latent grid (image_size / patch_size squared tokens), as in Janus-Pro (24 x 24 = 576), so that
    understanding and generation agree on the number of image tokens."""
    grid = image_size // patch_size
    n_down = int(math.log2(patch_size))  # the VQ encoder halves the resolution once per level but the last
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=lm_width, intermediate_size=2 * lm_width,
                       num_hidden_layers=lm_layers, num_attention_heads=lm_heads, num_key_value_heads=lm_heads,
                       max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    vision = JanusVisionConfig(hidden_size=vision_width, num_hidden_layers=vision_layers, num_attention_heads=4,
                               image_size=image_size, patch_size=patch_size, projection_dim=lm_width, depth=2,
                               num_image_tokens=grid * grid)
    vq = JanusVQVAEConfig(embed_dim=codebook_dim, num_embeddings=codebook_size, latent_channels=64, base_channels=32,
                          channel_multiplier=[1] + [2] * n_down, num_res_blocks=1, projection_dim=lm_width,
                          image_token_embed_dim=lm_width, num_hidden_layers=2)
    return JanusConfig(text_config=text, vision_config=vision, vq_config=vq,
                       image_token_id=tokenizer.convert_tokens_to_ids(IMAGE))


# -----------------------------------------------------------------------------------------------
# LoRA: a small built-in one on the LM projections (no peft)

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRALinear(nn.Module):
    """y = W x + (alpha / r) * B A dropout(x), with B = 0 at start so the wrapped layer is unchanged.
    A and B are float32 whatever W is: a frozen bfloat16 base halves memory, while AdamW steps of ~1e-6
    would vanish in bfloat16 weights (under CUDA autocast the matmuls still run in bfloat16)."""

    def __init__(self, base, r=16, alpha=32, dropout=0.05):
        super().__init__()
        self.base, self.scale = base, alpha / r
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, device=base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        lora = F.linear(F.linear(self.dropout(x).to(self.lora_A.dtype), self.lora_A), self.lora_B) * self.scale
        return self.base(x) + lora.to(x.dtype)

    def merged_weight(self):
        return (self.base.weight.float() + (self.lora_B @ self.lora_A) * self.scale).to(self.base.weight.dtype)


def add_lora(module, r=16, alpha=32, dropout=0.05, targets=LORA_TARGETS):
    """Wrap every nn.Linear named in `targets` under `module` with LoRA; return the LoRA parameters."""
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if name in targets and isinstance(child, nn.Linear):
                setattr(parent, name, LoRALinear(child, r, alpha, dropout))
    return [p for m in module.modules() if isinstance(m, LoRALinear) for p in (m.lora_A, m.lora_B)]


def merge_lora(module):
    """Fold every LoRA into its base weight, in place, leaving plain nn.Linear layers."""
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LoRALinear):
                with torch.no_grad():
                    child.base.weight.copy_(child.merged_weight())
                setattr(parent, name, child.base)


def merged_state_dict(module):
    """The state dict `module` would have after merge_lora, without changing the module."""
    sd = module.state_dict()
    for path, m in module.named_modules():
        if isinstance(m, LoRALinear):
            for k in ("base.weight", "base.bias", "lora_A", "lora_B"):
                sd.pop(f"{path}.{k}", None)
            sd[f"{path}.weight"] = m.merged_weight().detach()
            if m.base.bias is not None:
                sd[f"{path}.bias"] = m.base.bias.detach()
    return sd


# -----------------------------------------------------------------------------------------------
# The model

def _left_pad(seqs, pad_id):
    """Left-pad lists of token ids; return ids, attention mask and position ids (0 at the first real token)."""
    n = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, n - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[i, n - len(s):] = 1
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


class UMM(nn.Module):
    """Janus plus its tokenizer and preprocessing, behind the verbs that train.py and eval.py call.

    Pixels everywhere are float tensors (B, 3, S, S) in the model's normalised space
    ((x / 255 - mean) / std; Janus-Pro uses mean = std = 0.5, so [-1, 1]). Image tokens are
    sequences (B, N, ...) in row-major order over the h x w latent grid, N = h * w.
    """

    def __init__(self, janus, tokenizer, image_mean=0.5, image_std=0.5, system_prompt="", min_size=14):
        super().__init__()
        self.janus, self.tokenizer = janus, tokenizer
        self.image_mean, self.image_std, self.min_size = image_mean, image_std, min_size
        self.system_prompt = system_prompt
        # appended to every question on a line of its own, as LLaVA-style VQA evaluation asks for short answers
        # ("Answer the question using a single word or phrase."); train.py and eval.py set it (prompt_suffix)
        self.prompt_suffix = ""
        self.answer_tokens = 16  # most tokens of a generated answer (answer); VQAv2's answers fit in 16
        cfg = janus.config
        self.image_size = cfg.vision_config.image_size
        self.num_image_tokens = cfg.vision_config.num_image_tokens
        self.grid = cfg.vq_config.num_patches  # VQ latent grid side
        if self.grid * self.grid != self.num_image_tokens:
            raise ValueError(f"vision_config.num_image_tokens={self.num_image_tokens} but the VQ latent grid is "
                             f"{self.grid}x{self.grid}: understanding and generation must agree on the token count")
        ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
        missing = [t for t, i in ids.items() if i is None or i == tokenizer.unk_token_id]
        if missing:
            raise ValueError(f"tokenizer lacks Janus-Pro special tokens {missing}")
        if ids[IMAGE] != cfg.image_token_id:
            raise ValueError(f"tokenizer's {IMAGE} is id {ids[IMAGE]} but config.image_token_id is {cfg.image_token_id}")
        self.pad_id, self.bos_id, self.eos_id = ids[PAD], ids[BOS], ids[EOS]
        self.image_id, self.boi_id = ids[IMAGE], ids[BOI]
        # transformers' generate(generation_mode="image") reads BOI from here. Saved with the model only if
        # the generation config is marked as not derived from the model config (else loading drops it).
        gc = janus.generation_config
        gc.generation_kwargs = {**(getattr(gc, "generation_kwargs", None) or {}), "boi_token_id": self.boi_id}
        gc._from_model_config = False

    # ---- loading and saving -------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path, dtype=torch.float32):
        """Load a local Hugging Face directory (Janus-Pro-1B / 7B converted to HF format, or ours).
        Preprocessing and the system prompt follow the directory's processor files when present."""
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise FileNotFoundError(f"{path}: not a Hugging Face model directory (no config.json)")
        janus = JanusForConditionalGeneration.from_pretrained(path, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(path)
        kw = {}
        proc = _read_json(os.path.join(path, "processor_config.json"))
        # older directories keep the image processor in preprocessor_config.json; transformers 5 nests it here
        pre = _read_json(os.path.join(path, "preprocessor_config.json")) or proc.get("image_processor", {})
        if pre:
            kw.update(image_mean=float(pre.get("image_mean", [0.5])[0]), image_std=float(pre.get("image_std", [0.5])[0]),
                      min_size=int(pre.get("min_size", 14)))
        if proc.get("use_default_system_prompt"):
            kw["system_prompt"] = JANUS_SYSTEM_PROMPT
        return cls(janus, tokenizer, **kw)

    @classmethod
    def from_config(cls, config, tokenizer, aligner_init_scale=1.0, pos_init_scale=1.0, **kw):
        """A freshly initialised model. aligner_init_scale < 1 starts the aligner's last layer small, so
        that image tokens enter the LM nearer the scale of the text embeddings; pos_init_scale > 1 starts
        SigLIP's position embeddings larger, nearer the scale of its patch embeddings (README: base model)."""
        janus = JanusForConditionalGeneration(config)
        with torch.no_grad():
            janus.model.vision_model.embeddings.position_embedding.weight.mul_(pos_init_scale)
            last = ([janus.model.aligner.fc1] + list(janus.model.aligner.hidden_layers))[-1]
            last.weight.mul_(aligner_init_scale)
            last.bias.mul_(aligner_init_scale)
        return cls(janus, tokenizer, **kw)

    def save_pretrained(self, path, dtype=None):
        """Write a Hugging Face directory (config.json, model.safetensors, tokenizer files) with any
        LoRA merged into the weights, loadable by JanusForConditionalGeneration.from_pretrained alone."""
        sd = merged_state_dict(self.janus)
        if dtype is not None:
            sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
        # transformers' "Writing model shards" bar drawn on the line it starts on, as eval.py's are: inside train.py's
        # training bar, a bar of its own below it would move the cursor back up with escape codes a log file keeps
        previous = hf_logging.set_tqdm_hook(lambda make, args, kwargs: make(*args, **{**kwargs, "position": 0, "leave": False}))
        try:
            self.janus.save_pretrained(path, state_dict=sd)
        finally:
            hf_logging.set_tqdm_hook(previous)
        self.tokenizer.save_pretrained(path)
        with open(os.path.join(path, "preprocessor_config.json"), "w") as f:
            json.dump({"image_processor_type": "JanusImageProcessor", "image_mean": [self.image_mean] * 3,
                       "image_std": [self.image_std] * 3, "min_size": self.min_size,
                       "size": {"height": self.image_size, "width": self.image_size}}, f, indent=2)
        with open(os.path.join(path, "processor_config.json"), "w") as f:
            json.dump({"processor_class": "JanusProcessor", "num_image_tokens": self.num_image_tokens,
                       "use_default_system_prompt": self.system_prompt == JANUS_SYSTEM_PROMPT}, f, indent=2)

    # ---- what trains, and how it runs -------------------------------------------------------------

    PARTS = ("vision", "aligner", "lm", "gen", "vq")  # what set_trainable can train fully

    def part(self, name):
        """The modules of a named part: 'vision' (SigLIP), 'aligner', 'lm' (LLaMA and lm_head), 'gen'
        (generation embeddings, aligner and head), 'vq' (the VQ model)."""
        jm = self.janus.model
        groups = {"vision": [jm.vision_model], "aligner": [jm.aligner], "lm": [jm.language_model, self.janus.lm_head],
                  "gen": [jm.generation_embeddings, jm.generation_aligner, jm.generation_head], "vq": [jm.vqmodel]}
        if name not in groups:
            raise ValueError(f"unknown part {name!r}; parts: {', '.join(self.PARTS)}")
        return groups[name]

    def set_trainable(self, parts=(), lora_r=0, lora_alpha=32, lora_dropout=0.05):
        """Freeze everything, then train the named parts fully and, with lora_r > 0, LoRA on the LM's
        projections. Returns {name: parameter} of what trains, in a fixed order."""
        self.requires_grad_(False)
        for name in parts:
            for m in self.part(name):
                m.requires_grad_(True)
        if lora_r:
            add_lora(self.janus.model.language_model, lora_r, lora_alpha, lora_dropout)  # LoRA parameters require grad
        return {n: p for n, p in self.named_parameters() if p.requires_grad}

    def train(self, mode=True, dropout=True):
        """nn.Module.train; dropout=False keeps training mode (gradient checkpointing stays on) with every dropout
        layer off: train.py's opponent passes attack the model as it stands, as an evaluation's attack does."""
        super().train(mode)
        if mode and not dropout:
            for m in self.modules():
                if isinstance(m, nn.Dropout):
                    m.eval()
        return self

    def token_dim(self, at="vq"):
        """The width of the visual tokens at a perturbation interface (visual_tokens)."""
        if at == "vq":
            return self.codebook.shape[1]
        if at == "aligner":
            return self.janus.config.text_config.hidden_size
        raise ValueError(f"perturb_at={at!r}: expected 'vq' or 'aligner'")

    def compile_towers(self):
        """torch.compile where a training step spends its time: the language model, the vision tower, and the VQ
        encoder and decoder (perturb_at='vq' runs the decoder forward and backward every step, and decodes every
        mined candidate and hard sample). Compilation happens at each module's first call; shapes that vary from
        step to step (batch plus hard samples, prompt and answer lengths) are made dynamic by torch.compile after
        the first change, so a step compiles nothing new once each has been seen (compiled_graphs counts them)."""
        jm = self.janus.model
        for m in (jm.language_model, jm.vision_model, jm.vqmodel.encoder, jm.vqmodel.decoder):
            m.compile()

    def gradient_checkpointing_enable(self):
        self.janus.activation_checkpointing_enable()

    def gradient_checkpointing_disable(self):
        self.janus.activation_checkpointing_disable()

    @property
    def device(self):
        return self.janus.lm_head.weight.device

    @property
    def dtype(self):
        return self.janus.lm_head.weight.dtype

    # ---- pixels ---------------------------------------------------------------------------------

    def preprocess(self, images):
        """uint8 RGB images (a list of (3, H, W) tensors, or one (B, 3, H, W) tensor) -> normalised
        pixels (B, 3, S, S), as transformers' Janus image processor does it: resize the longest side to
        S (bicubic, antialiased), pad to a square with the mean colour, rescale, normalise."""
        S, out = self.image_size, []
        for im in images:
            if im.dtype != torch.uint8 or im.dim() != 3 or im.shape[0] != 3:
                raise ValueError(f"preprocess expects uint8 RGB images (3, H, W), got {tuple(im.shape)} {im.dtype}")
            x = im.to(self.device, torch.float32)
            h, w = x.shape[-2:]
            if (h, w) != (S, S):
                scale = S / max(h, w)
                nh, nw = max(round(h * scale), self.min_size), max(round(w * scale), self.min_size)
                # PIL resamples uint8 images in two passes, horizontal then vertical, rounding in between
                for size in ((h, nw), (nh, nw)):
                    x = F.interpolate(x[None], size=size, mode="bicubic", antialias=True, align_corners=False)[0]
                    x = x.round().clamp(0, 255)
                if nh != nw:
                    m = max(nh, nw)
                    canvas = torch.full((3, m, m), float(int(self.image_mean * 255)), device=x.device)
                    top, left = (m - nh) // 2, (m - nw) // 2
                    canvas[:, top:top + nh, left:left + nw] = x
                    x = canvas
            out.append(x)
        x = torch.stack(out) / 255.0
        return ((x - self.image_mean) / self.image_std).to(self.dtype)

    def to_uint8(self, pixels):
        """Normalised pixels (B, 3, S, S) -> uint8 RGB, for the oracle and for saving images."""
        x = pixels.detach().float() * self.image_std + self.image_mean
        return (x * 255).round().clamp(0, 255).to(torch.uint8).cpu()

    # ---- understanding --------------------------------------------------------------------------

    def prompt_ids(self, question):
        """Janus-Pro's understanding prompt, as its chat template and JanusProcessor lay it out.

        Tokenized with one image placeholder, which is then repeated num_image_tokens times: the
        tokenizer splits added special tokens out before BPE, so the ids are exactly those of the prompt
        with all N placeholders, and the 576 of Janus-Pro cost 0.5 ms a prompt instead of 3.7 ms.
        With a prompt_suffix the user's text is the question, a newline and the suffix (lmms-eval's VQAv2 prompt)."""
        question = f"{question}\n{self.prompt_suffix}" if self.prompt_suffix else question
        text = f"{self.system_prompt}{USER}: {BOI}{IMAGE}{EOI}\n{question.strip()}\n\n{ASSISTANT}:"
        ids = self.tokenizer(text).input_ids
        at = ids.index(self.image_id)
        return ids[:at] + [self.image_id] * self.num_image_tokens + ids[at + 1:]

    def answer_ids(self, answer):
        return self.tokenizer(" " + answer.strip(), add_special_tokens=False).input_ids + [self.eos_id]

    def vision_features(self, pixels):
        """SigLIP's last hidden states, (B, N, D_vision)."""
        return self.janus.model.vision_model(pixel_values=pixels.to(self.dtype)).last_hidden_state

    def align(self, features):
        """SigLIP features (B, N, D_vision) -> understanding tokens through the aligner (B, N, D_lm)."""
        return self.janus.model.aligner(features)

    def image_embeds(self, pixels):
        """Understanding tokens: SigLIP features through the aligner, (B, N, D_lm)."""
        return self.align(self.vision_features(pixels))

    def buffered_embeds(self, items):
        """Understanding embeds of hard-buffer items: decoded from their codes ('vq' items), or their
        image's embeds plus the stored perturbation ('aligner' items)."""
        if "codes" in items[0]:
            with torch.no_grad():
                px = self.decode_codes(torch.stack([it["codes"] for it in items]).to(self.device)).clamp(-1, 1)
            return self.image_embeds(px)
        # float16 as stored; stacked in float32, which CPU autocast accepts (it has no float16 rule for stack)
        deltas = torch.stack([it["delta"].float() for it in items]).to(self.device)
        return self.image_embeds(self.preprocess([it["image"] for it in items])) + deltas.to(self.dtype)

    def _splice(self, ids, image_embeds):
        embeds = self.janus.model.language_model.get_input_embeddings()(ids)
        where = (ids == self.image_id).unsqueeze(-1)
        return embeds.masked_scatter(where, image_embeds.to(embeds.dtype))

    def answer_logits(self, image_embeds, questions, answers=None):
        """Next-token logits over the whole (left-padded) understanding sequence, and its labels
        (-100 on prompt and padding). For tests and analysis; training uses answer_loss."""
        tails = [self.answer_ids(a) for a in answers] if answers else [[] for _ in questions]
        seqs = [self.prompt_ids(q) + t for q, t in zip(questions, tails)]
        ids, mask, pos = (t.to(self.device) for t in _left_pad(seqs, self.pad_id))
        out = self.janus.model.language_model(inputs_embeds=self._splice(ids, image_embeds),
                                              attention_mask=mask, position_ids=pos, use_cache=False)
        labels = torch.full_like(ids, -100)
        for i, t in enumerate(tails):
            if t:  # left padding: the answer tokens are the last ones
                labels[i, -len(t):] = ids[i, -len(t):]
        return self.janus.lm_head(out.last_hidden_state), labels

    def answer_loss(self, image_embeds, questions, answers):
        """Per-sample teacher-forced cross-entropy of the answer given image and question (B,).
        The prompt is masked; logits are computed only where an answer token is predicted."""
        seqs, n_ans = [], []
        for q, a in zip(questions, answers):
            p, t = self.prompt_ids(q), self.answer_ids(a)
            seqs.append(p + t)
            n_ans.append(len(t))
        ids, mask, pos = (t.to(self.device) for t in _left_pad(seqs, self.pad_id))
        hidden = self.janus.model.language_model(inputs_embeds=self._splice(ids, image_embeds),
                                                 attention_mask=mask, position_ids=pos, use_cache=False).last_hidden_state
        L = ids.shape[1]
        n_ans_t = torch.tensor(n_ans, device=self.device)
        col = torch.arange(L, device=self.device)
        is_target = col[None, :] >= (L - n_ans_t)[:, None]             # answer tokens (left padding: at the end)
        predictor = torch.roll(is_target, shifts=-1, dims=1)           # the position before each target predicts it
        predictor[:, -1] = False
        logits = self.janus.lm_head(hidden[predictor]).float()
        ce = F.cross_entropy(logits, ids[is_target], reduction="none")
        row = torch.arange(len(seqs), device=self.device).repeat_interleave(n_ans_t)
        return torch.zeros(len(seqs), device=self.device).index_add(0, row, ce) / n_ans_t

    @torch.no_grad()
    def answer(self, image_embeds, questions, max_new_tokens=None):
        """Greedy answers (list of str), with a KV cache; at most max_new_tokens tokens (default: answer_tokens)."""
        max_new_tokens = max_new_tokens or self.answer_tokens
        ids, mask, pos = (t.to(self.device) for t in _left_pad([self.prompt_ids(q) for q in questions], self.pad_id))
        lm, cache = self.janus.model.language_model, DynamicCache()
        embeds = self._splice(ids, image_embeds)
        out_ids = torch.full((len(questions), max_new_tokens), self.eos_id, device=self.device)
        done = torch.zeros(len(questions), dtype=torch.bool, device=self.device)
        for t in range(max_new_tokens):
            h = lm(inputs_embeds=embeds, attention_mask=mask, position_ids=pos, cache=cache,
                   use_cache=True).last_hidden_state[:, -1]
            nxt = self.janus.lm_head(h).argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, self.eos_id), nxt)
            out_ids[:, t] = nxt
            done |= nxt == self.eos_id
            if done.all():
                break
            embeds = lm.get_input_embeddings()(nxt[:, None])
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            pos = pos[:, -1:] + 1
        texts = []
        for row in out_ids.tolist():
            row = row[:row.index(self.eos_id)] if self.eos_id in row else row
            texts.append(self.tokenizer.decode(row, skip_special_tokens=True).strip())
        return texts

    # ---- the VQ model: codebook space, projection, decoding -------------------------------------

    @property
    def codebook(self):
        """The codebook as decoding sees it: transformers' get_codebook_entry L2-normalises each
        entry before the decoder, so codebook space is the unit sphere (K, C)."""
        return F.normalize(self.janus.model.vqmodel.quantize.embedding.weight, dim=-1)

    def vq_encode(self, pixels):
        """Pixels -> continuous codebook-space tokens z (B, N, C), before quantisation."""
        vq = self.janus.model.vqmodel
        z = vq.quant_conv(vq.encoder(pixels.to(self.dtype)))
        return z.flatten(2).transpose(1, 2)

    def project_to_codebook(self, z):
        """Snap tokens (B, N, C) to their nearest codebook entries, the way decoding reads them:
        both sides L2-normalised, so nearest in Euclidean distance = highest cosine. Returns the
        projected tokens, exactly codebook entries in value, with a straight-through gradient to z
        (through the normalisation), and the codes (B, N).

        transformers' VQ quantizer forward picks codes by plain Euclidean distance to the
        *unnormalised* codebook, which disagrees with get_codebook_entry; UniGame uses this
        projection everywhere (encoding, the game, VQ training) so codes and decoding agree."""
        zn = F.normalize(z, dim=-1)
        codebook = self.codebook
        # the nearest code chosen in float32 even under bf16 autocast, whose 8-bit mantissa would tie or swap
        # neighbouring codes' cosines (the choice has no gradient; the cost is one (B*N, C) x (C, K) product)
        with torch.autocast(zn.device.type, enabled=False):
            codes = (zn.detach().float() @ codebook.t().float()).argmax(-1)
        zq = codebook[codes].to(zn.dtype)
        return zn + (zq - zn).detach(), codes

    def vq_decode(self, zq):
        """Codebook-space tokens (B, N, C) -> pixels (B, 3, S, S); differentiable."""
        vq = self.janus.model.vqmodel
        B, N, C = zq.shape
        h = zq.transpose(1, 2).reshape(B, C, self.grid, self.grid)
        return vq.decoder(vq.post_quant_conv(h.to(self.dtype)))

    def decode_codes(self, codes):
        return self.vq_decode(self.codebook[codes])

    # ---- the interface the game plays at ---------------------------------------------------------

    def visual_tokens(self, pixels, at="vq"):
        """The tokens a perturbation is added to. at='vq': codebook-space tokens of the VQ encoder,
        on the unit sphere like the codebook (B, N, C). at='aligner': understanding tokens after the
        aligner (B, N, D_lm)."""
        if at == "vq":
            return F.normalize(self.vq_encode(pixels), dim=-1)
        if at == "aligner":
            return self.image_embeds(pixels)
        raise ValueError(f"perturb_at={at!r}: expected 'vq' or 'aligner'")

    def perturbed_view(self, tokens, at="vq"):
        """What the understanding branch sees of (perturbed) visual tokens: (image embeds, pixels, codes).
        at='vq' projects the tokens onto the decoder's manifold (nearest codebook entries, with a
        straight-through gradient; codes (B, N) are the entries chosen) and decodes them to an image, so
        the adversarial input is a real, decodable picture; gradients flow back through decoder, vision
        encoder and LM. at='aligner' uses the tokens as they are (cheaper, not decoder-constrained);
        pixels and codes are then None."""
        if at == "vq":
            zq, codes = self.project_to_codebook(tokens)
            pixels = self.vq_decode(zq).clamp(-1, 1)
            return self.image_embeds(pixels), pixels, codes
        if at == "aligner":
            return tokens, None, None
        raise ValueError(f"perturb_at={at!r}: expected 'vq' or 'aligner'")

    def generated_view(self, prompts, at="vq", steer=None, cfg_scale=1.0, temperature=1.0):
        """Images the generation branch draws of `prompts`, as the understanding branch sees them: (image embeds,
        pixels, what a hard buffer stores of each). steer(tokens) returns a perturbation: at='vq' it moves each
        generated token before its code is chosen (the generator steered); at='aligner' it is added to the
        embeds of the image drawn, and stored beside it."""
        hook = (lambda v: v + steer(v)) if steer and at == "vq" else None
        codes = self.generate_images(prompts, cfg_scale, temperature, token_hook=hook)
        pixels = self.decode_codes(codes).clamp(-1, 1)
        embeds = self.image_embeds(pixels)
        if at == "vq":
            return embeds, pixels, {"codes": codes}
        delta = steer(embeds) if steer else torch.zeros_like(embeds)
        return embeds + delta, pixels, {"image": self.to_uint8(pixels), "delta": delta.half()}

    def codes_changed(self, tokens, codes):
        """Per sample, the share of image tokens whose codebook entry `codes` (of a perturbed view) differs from
        that of the clean codebook-space tokens: how much of a perturbation survives the projection."""
        return (codes != self.project_to_codebook(tokens)[1]).float().mean(-1)

    def perturbed_loss(self, tokens, questions, answers, at="vq"):
        """Per-sample answer cross-entropy of the view of (perturbed) tokens (perturbed_view): what an attack ascends."""
        return self.answer_loss(self.perturbed_view(tokens, at)[0], questions, answers)

    @property
    def text_dim(self):
        """The LM's width: of its input embeddings, of question_embeds, and of the tokens after the aligner."""
        return self.janus.config.text_config.hidden_size

    @torch.no_grad()
    def question_embeds(self, questions):
        """Each question's mean LM input embedding, (B, text_dim) float32, detached: the question's own tokens,
        without the prompt around them. What a perturber that sees the context reads of the question."""
        ids, mask, _ = (t.to(self.device) for t in _left_pad(
            [self.tokenizer(q.strip(), add_special_tokens=False).input_ids or [self.pad_id] for q in questions], self.pad_id))
        embeds = self.janus.model.language_model.get_input_embeddings()(ids).float()
        return (embeds * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)

    def perturber_inputs(self, perturber, tokens, questions, answers, at="vq"):
        """What a Perturber sees beside the clean tokens, as keyword arguments for it: with 'grad' in its sees, the
        answer loss's gradient at the tokens (perturber.input_gradient); with 'context', the questions' embeddings.
        Training and evaluation both call this, so a perturber is evaluated on what it was trained on."""
        seen = {}
        if "grad" in perturber.features:
            seen["grad"] = input_gradient(lambda t: self.perturbed_loss(t, questions, answers, at), tokens)
        if "context" in perturber.features:
            seen["question"] = self.question_embeds(questions)
        return seen

    def image_codes(self, pixels):
        """VQ codes (B, N) of images: the generation targets."""
        return self.project_to_codebook(self.vq_encode(pixels))[1]

    def vq_losses(self, pixels, beta=0.25):
        """For training the VQ model from scratch: reconstruction MSE through the straight-through
        projection, and the codebook + commitment loss on the unit sphere. Returns (rec, codebook, codes)."""
        zn = F.normalize(self.vq_encode(pixels), dim=-1)
        zq_st, codes = self.project_to_codebook(zn)
        e = self.codebook[codes]
        codebook_loss = F.mse_loss(e, zn.detach()) + beta * F.mse_loss(zn, e.detach())
        rec = self.vq_decode(zq_st)
        return F.mse_loss(rec.float(), pixels.float()), codebook_loss, codes

    # ---- generation -----------------------------------------------------------------------------

    def generation_prompt_ids(self, caption):
        """Janus-Pro's text-to-image prompt: the chat turn, then the begin-of-image token."""
        return self.tokenizer(f"{USER}: {caption.strip()}\n\n{ASSISTANT}:{BOI}").input_ids

    def code_embeds(self, codes):
        """VQ codes -> LM-space input embeddings (generation_embeddings -> generation_aligner)."""
        return self.janus.prepare_embeddings_for_image_generation(codes)

    def text_to_image_loss(self, captions, pixels, uncond_p=0.0):
        """Per-sample text-to-image cross-entropy of the VQ codes of these images given their captions; each
        sample gets the unconditional prompt with probability uncond_p (so that guidance has a branch to use)."""
        with torch.no_grad():
            codes = self.image_codes(pixels)
        return self.image_loss(captions, codes, torch.rand(len(captions)) < uncond_p)

    def image_loss(self, captions, codes, uncond=None):
        """Per-sample text-to-image cross-entropy over the image codes (B,), teacher forced.
        uncond (bool (B,)) marks samples whose prompt is replaced by the unconditional one that
        classifier-free guidance uses (every token but BOS and BOI padded), to train that branch."""
        ids, mask, pos = (t.to(self.device) for t in _left_pad([self.generation_prompt_ids(c) for c in captions], self.pad_id))
        if uncond is not None:
            drop = uncond.to(self.device)[:, None] & (ids != self.bos_id) & (ids != self.boi_id) & (mask == 1)
            ids = ids.masked_fill(drop, self.pad_id)
        L, N = ids.shape[1], codes.shape[1]
        embeds = torch.cat([self.janus.model.language_model.get_input_embeddings()(ids),
                            self.code_embeds(codes[:, :-1])], 1)
        mask = torch.cat([mask, torch.ones_like(codes[:, :-1])], 1)
        pos = torch.cat([pos, pos[:, -1:] + torch.arange(1, N, device=self.device)], 1)
        hidden = self.janus.model.language_model(inputs_embeds=embeds, attention_mask=mask,
                                                 position_ids=pos, use_cache=False).last_hidden_state[:, L - 1:]
        logits = self.janus.model.generation_head(hidden).float()
        return F.cross_entropy(logits.transpose(1, 2), codes, reduction="none").mean(1)

    @torch.no_grad()
    def generate_images(self, captions, cfg_scale=5.0, temperature=1.0, generator=None, token_hook=None,
                        static_cache=None):
        """Autoregressive image codes (B, N) with classifier-free guidance and a KV cache.

        The unconditional half of the batch is the same prompt with every token but BOS and BOI
        replaced by padding (as Janus-Pro and transformers do). temperature=0 is greedy.
        token_hook, if given, maps each generated token's codebook-space vector (B, C) to a new
        vector before it is fed back; the result is snapped to the nearest code (the generation
        stays on the decoder's manifold) and that code is kept. This is where a perturber plugs in.

        static_cache: gpt-fast's recipe -- the KV cache allocated once for the whole sequence and the
        attention mask built up front, so every decode step has the same shapes, and on CUDA that step
        compiled with CUDA graphs (torch.compile mode='reduce-overhead'), which takes away the per-token
        launch overhead that dominates a decode step. None: on CUDA only (on CPU the static cache alone
        is no faster, and compiling costs more than it saves). Both caches give the same codes.

        Generation is inference: it runs in eval mode -- no dropout, and no gradient checkpointing,
        which in train mode silently drops the KV cache -- and leaves every module's mode as it was."""
        B, N = len(captions), self.num_image_tokens
        ids, mask, pos = (t.to(self.device) for t in _left_pad([self.generation_prompt_ids(c) for c in captions], self.pad_id))
        guided = cfg_scale is not None and cfg_scale != 1.0
        if guided:
            uncond = ids.clone()
            uncond[(uncond != self.bos_id) & (uncond != self.boi_id)] = self.pad_id
            ids, mask, pos = torch.cat([ids, uncond]), torch.cat([mask, mask]), torch.cat([pos, pos])
        static = self.device.type == "cuda" if static_cache is None else static_cache
        if static:  # the mask of the whole sequence: the prompt's left padding, then N - 1 fed-back codes
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], N - 1)], 1)
            cache, step = self._static_cache(mask.shape[0], mask.shape[1]), self._decode_step()
        else:
            cache, step = DynamicCache(), self._decode_logits
        lm = self.janus.model.language_model
        modes = [(m, m.training) for m in self.modules()]
        self.eval()
        try:
            h = lm(inputs_embeds=lm.get_input_embeddings()(ids), attention_mask=mask, position_ids=pos,
                   cache=cache, use_cache=True).last_hidden_state[:, -1]
            logits = self.janus.model.generation_head(h).float()
            codes = torch.zeros(B, N, dtype=torch.long, device=self.device)
            for i in range(N):
                if guided:
                    cond, unc = logits[:B], logits[B:]
                    logits = unc + cfg_scale * (cond - unc)
                if temperature and temperature > 0:
                    nxt = torch.multinomial(F.softmax(logits / temperature, -1), 1, generator=generator)[:, 0]
                else:
                    nxt = logits.argmax(-1)
                if token_hook is not None:
                    nxt = self.project_to_codebook(token_hook(self.codebook[nxt])[:, None])[1][:, 0]
                codes[:, i] = nxt
                if i == N - 1:
                    break
                if not static:
                    mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
                pos = pos[:, -1:] + 1
                logits = step(torch.cat([nxt, nxt])[:, None] if guided else nxt[:, None], mask, pos, cache)
        finally:
            for m, training in modes:
                m.training = training
        return codes

    def _decode_logits(self, codes, mask, pos, cache):
        """One decode step: the codes just drawn (B, 1) in, the next code's logits (B, K) out."""
        h = self.janus.model.language_model(inputs_embeds=self.code_embeds(codes), attention_mask=mask, position_ids=pos,
                                            cache=cache, use_cache=True).last_hidden_state[:, -1]
        return self.janus.model.generation_head(h).float()

    def _decode_step(self):
        """The static path's decode step: compiled on CUDA (once; shapes are static, so it recompiles only
        for a new batch size or length), eager elsewhere."""
        if self.device.type != "cuda":
            return self._decode_logits
        if getattr(self, "_compiled_decode", None) is None:
            self._compiled_decode = torch.compile(self._decode_logits, mode="reduce-overhead", fullgraph=True)
        return self._compiled_decode

    def _static_cache(self, batch, length):
        """A zeroed StaticCache for `batch` sequences of `length` tokens. The last one is kept and reused:
        CUDA graphs are recorded against its fixed addresses (it holds its memory between calls)."""
        key = (batch, length, self.device, torch.is_autocast_enabled(self.device.type))
        if getattr(self, "_kept_cache", (None,))[0] != key:
            self._kept_cache = (key, StaticCache(config=self.janus.model.language_model.config, max_cache_len=length))
        cache = self._kept_cache[1]
        cache.reset()
        return cache


def compiled_graphs():
    """How many graphs torch.compile has built in this process so far. Every new shape that is not yet dynamic, grad
    or no-grad pass, train or eval mode adds one: train.py logs it with each step, so that a step that recompiles shows."""
    from torch._dynamo.utils import counters
    return counters["stats"]["unique_graphs"]


def weight_names(path):
    """Names of the tensors in a Hugging Face directory's safetensors files, read from their headers alone
    (so that what a checkpoint lacks is known before it is loaded)."""
    from safetensors import safe_open
    names = set()
    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors"):
            try:
                with safe_open(os.path.join(path, name), "pt") as f:
                    names.update(f.keys())
            except Exception as e:
                raise SystemExit(f"cannot read {os.path.join(path, name)}: {type(e).__name__}: {e}") from None
    return names


def check_weights(path, generation=False, vq=False):
    """Stop, naming what lacks, when the weights in `path` have no generation head (generation=True) or no VQ
    model (vq=True): read from the safetensors headers, before anything is loaded. A directory without
    safetensors files is not checked."""
    held = weight_names(path)
    if held and generation and not any(".generation_head." in n for n in held):
        raise SystemExit(f"config error: mine='generate' needs a generation head, but {path} has no generation_head weights")
    if held and vq and not any(".vqmodel." in n for n in held):
        raise SystemExit(f"config error: perturb_at='vq' needs the VQ model, but {path} has no vqmodel weights: use perturb_at='aligner'")


def _read_json(path):
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None


# -----------------------------------------------------------------------------------------------
# A CLIP consistency scorer, for when a local CLIP checkpoint is at hand

def clip_scorer(path, device="cpu"):
    """s(images, texts) = cosine between CLIP's image and text embeddings, in [-1, 1], from a local
    directory that transformers' CLIPModel and AutoTokenizer load. images: float (B, 3, H, W) in
    [0, 1]; resized to CLIP's input size and normalised with the directory's preprocessing values
    (OpenAI CLIP's when it has none)."""
    from transformers import CLIPModel
    model = CLIPModel.from_pretrained(path).to(device).eval().requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(path)
    pre = _read_json(os.path.join(path, "preprocessor_config.json"))
    mean = torch.tensor(pre.get("image_mean", [0.48145466, 0.4578275, 0.40821073]), device=device).view(1, 3, 1, 1)
    std = torch.tensor(pre.get("image_std", [0.26862954, 0.26130258, 0.27577711]), device=device).view(1, 3, 1, 1)
    size = model.config.vision_config.image_size

    def embed(out):
        return F.normalize(out if torch.is_tensor(out) else out.pooler_output, dim=-1)

    @torch.no_grad()
    def score(images, texts):
        x = F.interpolate(images.float().to(device), size=(size, size), mode="bicubic", align_corners=False)
        image = embed(model.get_image_features(pixel_values=(x.clamp(0, 1) - mean) / std))
        tok = tokenizer(list(texts), padding=True, truncation=True, max_length=model.config.text_config.max_position_embeddings,
                        return_tensors="pt").to(device)
        text = embed(model.get_text_features(input_ids=tok.input_ids, attention_mask=tok.attention_mask))
        return (image * text).sum(-1)
    return score


# -----------------------------------------------------------------------------------------------
# The trained perturber on its own, for export: weights as safetensors, its configuration as JSON

def save_perturber(perturber, path, **info):
    """Write path/perturber.safetensors (float32 weights, θ_ε included) and path/perturber.json (the
    constructor arguments, the current ε, and any `info`, e.g. perturb_at: where its tokens come from)."""
    os.makedirs(path, exist_ok=True)
    save_file({k: v.detach().float().contiguous().cpu() for k, v in perturber.state_dict().items()},
              os.path.join(path, "perturber.safetensors"))
    with open(os.path.join(path, "perturber.json"), "w") as f:
        json.dump({**perturber.config(), "eps": perturber.eps.item(), **info}, f, indent=2)


def load_perturber(path, device="cpu"):
    """The perturber written by save_perturber, and its JSON (a dict: configuration, eps, perturb_at...)."""
    meta = _read_json(os.path.join(path, "perturber.json"))
    if not meta:
        raise FileNotFoundError(f"{path}: no perturber.json")
    sizes = ("dim", "hidden", "eps_min", "eps_max", "eps_init", "relative", "noise_dim", "question_dim", "tokens")
    perturber = Perturber(**{k: meta[k] for k in sizes if k in meta}, sees=meta.get("sees", "token"))
    perturber.load_state_dict(load_file(os.path.join(path, "perturber.safetensors")))
    return perturber.to(device), meta
