"""A tiny tokenizer and a tiny random Llama, built here: no network, no hub."""

import json
import random

WORDS = ("the a cat dog bird sat ran flew on under over mat tree house red blue green big small one two three "
         "four five what is colour of sky sun moon answer question tell me about write poem story short long "
         "yes no please thanks hello world add sum equals and or not because then").split()
SPECIALS = ["<unk>", "<bos>", "<eos>", "<|system|>", "<|user|>", "<|assistant|>"]
# Assistant turns inside {% generation %}: trl's assistant-only loss masks by these markers.
CHAT_TEMPLATE = (
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'assistant' -%}<|assistant|> {% generation %}{{ m['content'] }} <eos>{% endgeneration %} "
    "{%- else -%}<|{{ m['role'] }}|> {{ m['content'] }} {% endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|assistant|> {%- endif -%}")
VOCAB_SIZE = 128  # the model's; the tokenizer has fewer tokens


def make_tokenizer(chat_template: bool = True):
    """WordLevel over WORDS, no pad token (the trainer must set one)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + sorted(set(WORDS) | set(".,?!:#")))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<bos>", eos_token="<eos>",
                                   additional_special_tokens=SPECIALS[3:])
    if chat_template:
        fast.chat_template = CHAT_TEMPLATE
    return fast


def llama_config(tokenizer):
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=VOCAB_SIZE, max_position_embeddings=256,
                       tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id)


def make_model_dir(path, seed: int = 0):
    """A model directory as users have them: config, safetensors weights, tokenizer."""
    import torch
    from transformers import LlamaForCausalLM

    tok = make_tokenizer()
    torch.manual_seed(seed)
    model = LlamaForCausalLM(llama_config(tok))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def alpaca_rows(n: int, seed: int = 0) -> list:
    rng = random.Random(seed)
    return [{"instruction": sentence(rng, rng.randint(3, 8)), "input": sentence(rng, 3) if i % 2 else "",
             "output": sentence(rng, rng.randint(2, 10))} for i in range(n)]


def chat_rows(n: int, seed: int = 0) -> list:
    rng = random.Random(seed)
    return [{"messages": [{"role": "user", "content": sentence(rng, rng.randint(3, 8))},
                          {"role": "assistant", "content": sentence(rng, rng.randint(2, 8))}]} for _ in range(n)]


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)
