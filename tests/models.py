"""Tiny models for tests: built from configs, random weights, a second to build each."""

from __future__ import annotations

import torch
from torch import nn

VOCAB = 96


def tiny_llama(seed: int = 0, dtype=torch.float32):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).to(dtype).eval()


def tiny_gpt2(seed: int = 0, dtype=torch.float32):
    """GPT-2 keeps its linear layers as HF Conv1D, with transposed (in, out) weights."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                        bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config).to(dtype).eval()


def tiny_bert(seed: int = 0, dtype=torch.float32, num_labels: int = 3):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=64, num_labels=num_labels)
    return BertForSequenceClassification(config).to(dtype).eval()


class SmallCNN(nn.Module):
    """A two-conv image classifier, the shape of the CNNs and UNet blocks LoRA is put on."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, kernel_size=3, stride=2, padding=1)
        self.head = nn.Linear(16, 5)

    def forward(self, x):  # (N, 3, H, W) -> (N, 5)
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        return self.head(x.mean(dim=(2, 3)))


def small_cnn(seed: int = 0, dtype=torch.float32):
    torch.manual_seed(seed)
    return SmallCNN().to(dtype).eval()


def inputs_for(kind: str, batch: int = 3, seed: int = 1):
    """A batch of inputs for each tiny model kind, as keyword arguments."""
    g = torch.Generator().manual_seed(seed)
    if kind == "cnn":
        return {"x": torch.randn(batch, 3, 8, 8, generator=g)}
    return {"input_ids": torch.randint(0, VOCAB, (batch, 10), generator=g)}


def random_ids(batch: int = 3, length: int = 10, seed: int = 1) -> torch.Tensor:
    """(batch, length) token ids of the tiny models' vocabulary."""
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits_of(model, ids, **kwargs) -> torch.Tensor:
    """The causal LM's or classifier's logits for `ids`, detached."""
    return model(input_ids=ids, **kwargs).logits.detach().clone()


def output_of(model, inputs):
    out = model(**inputs)
    return out if isinstance(out, torch.Tensor) else out.logits


BUILDERS = {"llama": tiny_llama, "gpt2": tiny_gpt2, "bert": tiny_bert, "cnn": small_cnn}


CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def tiny_chat_model_dir(path, corpus: list[str], seed: int = 0):
    """A tiny Llama with a byte-level BPE chat tokenizer trained on `corpus`, saved as a model directory.

    Small enough that a training run of a few steps takes a second, real enough that every part of
    the pipeline (chat template, masking, generation, BLEU) runs as it does on SmolLM2.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<pad>", "<|im_start|>", "<|im_end|>"]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(corpus, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<pad>",
                                        additional_special_tokens=specials[1:])
    tokenizer.chat_template = CHATML
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=None, tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def randomise(model: torch.nn.Module, seed: int = 0) -> None:
    """Non-zero, distinct values in every adapter tensor and in every modules_to_save copy."""
    from feathertune.methods.lora import LoraLayer
    from feathertune.saved_modules import ModulesToSave
    from feathertune.wrapping import wrapped_layers

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in wrapped_layers(model):
            if isinstance(layer, LoraLayer):
                for adapter in layer.lora.values():
                    adapter.A.copy_(torch.randn(adapter.A.shape, generator=g) * 0.3)
                    adapter.B.copy_(torch.randn(adapter.B.shape, generator=g) * 0.3)
                    if adapter.magnitude is not None:
                        adapter.magnitude.mul_(0.5 + torch.rand(adapter.magnitude.shape, generator=g))
            elif isinstance(layer, ModulesToSave):
                for copy in layer.copies.values():
                    for p in copy.parameters():
                        p.add_(torch.randn(p.shape, generator=g) * 0.5)
