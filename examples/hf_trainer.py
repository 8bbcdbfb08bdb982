"""A Hugging Face Trainer run with torchmem's callback, on a tiny model built from a config.

    pip install torchmem[transformers]
    python examples/hf_trainer.py

Nothing is downloaded: the GPT-2 model is made from a small config and trained
for 2 epochs on random tokens on the CPU. The callback logs
``torchmem/peak_bytes`` and ``torchmem/current_bytes`` at the Trainer's
``logging_steps`` through ``Trainer.log`` (``state.log_history`` and every
``report_to`` integration get them), runs the leak check at each epoch's end
and gathers the distributed summary at the end.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a model from a config needs no hub

import torch  # noqa: E402

from torchmem.integrations.transformers import TorchmemCallback  # noqa: E402

# Made before TrainingArguments, which initialises CUDA where there is one.
callback = TorchmemCallback(trace_dir=os.path.join("hf-run", "traces"))

from transformers import (  # noqa: E402
    GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments)


class RandomTokens(torch.utils.data.Dataset):
    def __init__(self, n: int = 64, length: int = 32) -> None:
        self.ids = torch.randint(0, 128, (n, length), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    model = GPT2LMHeadModel(GPT2Config(vocab_size=128, n_positions=32, n_embd=64, n_layer=2,
                                       n_head=2, bos_token_id=0, eos_token_id=0))
    training = TrainingArguments(output_dir="hf-run", num_train_epochs=args.epochs,
                                 per_device_train_batch_size=8, logging_steps=2,
                                 save_strategy="no", report_to="none", disable_tqdm=True)
    trainer = Trainer(model=model, args=training, train_dataset=RandomTokens(),
                      callbacks=[callback])
    trainer.train()
    for result in callback.epoch_results:
        print(result.report())
    for entry in trainer.state.log_history:
        if "torchmem/peak_bytes" in entry:
            print(f"step {entry['step']}: peak {entry['torchmem/peak_bytes']:,.0f} B, live "
                  f"{entry['torchmem/current_bytes']:,.0f} B")


if __name__ == "__main__":
    main()
