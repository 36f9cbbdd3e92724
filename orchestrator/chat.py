"""`orchestrator chat EXPORT [--once TEXT] [--max-new-tokens N]`: talk to a causal LM export.

Each turn's prompt is the conversation so far in the export's chat template (tokenizer_config.json's
chat_template, as training formatted chat rows: orchestrator/predict.py), or, for a model without one, the
conversation as plain text to be continued. Generation follows the export's generation_config.json (greedy where
it sets nothing). Interactive: a prompt on the terminal (rich); /reset forgets the conversation, /exit or Ctrl-D
ends it. --once TEXT prints the one answer to TEXT on stdout and exits (scripts, tests).
"""

from __future__ import annotations

import argparse
import sys
from typing import Dict, List, Optional, Sequence

from orchestrator.errors import UserError

DEFAULT_MAX_NEW_TOKENS = 256


class Chat:
    """An export and a conversation."""

    def __init__(self, export_dir: str, max_new_tokens: Optional[int] = None):
        from orchestrator.predict import Predictor

        self.predictor = Predictor(export_dir)
        if self.predictor.task != "causal_lm":
            raise UserError(f"{export_dir} is a classifier: chat needs a causal LM export; for labels use "
                            f"orchestrator predict {export_dir} --input rows.jsonl")
        config = getattr(self.predictor.model, "generation_config", None)
        self.max_new_tokens = max_new_tokens or getattr(config, "max_new_tokens", None) or DEFAULT_MAX_NEW_TOKENS
        self.templated = bool(self.predictor.tokenizer.chat_template)
        self.messages: List[Dict[str, str]] = []

    def reply(self, text: str) -> str:
        import torch

        self.messages.append({"role": "user", "content": text})
        p = self.predictor
        if self.templated:
            ids, stop = p.prompt_ids({"messages": self.messages})
        else:  # no chat template: the conversation as plain text, continued
            ids, stop = p.prompt_ids({"text": "\n".join(m["content"] for m in self.messages)})
        ids = ids[-p.max_length:]
        inputs = torch.tensor([ids], device=p.device)
        with torch.no_grad():  # the export's generation config (do_sample, temperature, eos ...) applies
            output = p.model.generate(inputs, attention_mask=torch.ones_like(inputs),
                                      max_new_tokens=self.max_new_tokens, pad_token_id=p.tokenizer.pad_token_id)
        answer = p.tokenizer.decode(output[0, len(ids):], skip_special_tokens=True)
        for marker in stop:
            answer = answer.split(marker)[0]
        answer = answer.strip()
        self.messages.append({"role": "assistant", "content": answer})
        return answer

    def reset(self) -> None:
        self.messages = []


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="orchestrator chat", description="Talk to a causal LM export: its chat "
                                     "template (else plain text) and its generation config.")
    parser.add_argument("export_dir", metavar="EXPORT", help="an export directory (<run_dir>/export, or one written "
                        "by orchestrator export)")
    parser.add_argument("--once", metavar="TEXT", help="print the answer to TEXT and exit")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="longest answer, in tokens (default: the "
                        f"generation config's max_new_tokens, else {DEFAULT_MAX_NEW_TOKENS})")
    opts = parser.parse_args(argv)
    chat = Chat(opts.export_dir, opts.max_new_tokens)
    if opts.once is not None:
        sys.stdout.write(chat.reply(opts.once) + "\n")
        return 0
    return interactive(chat, opts.export_dir)


def interactive(chat: Chat, export_dir: str) -> int:
    from rich.console import Console
    from rich.prompt import Prompt

    console = Console()
    form = "its chat template" if chat.templated else "plain text (it has no chat template)"
    console.print(f"[bold]{export_dir}[/bold]: prompts in {form}; /reset forgets, /exit or Ctrl-D ends")
    while True:
        try:
            text = Prompt.ask("[bold green]you[/bold green]", console=console)
        except (EOFError, KeyboardInterrupt):
            console.print()
            return 0
        if text.strip() in ("/exit", "/quit"):
            return 0
        if text.strip() == "/reset":
            chat.reset()
            console.print("[dim](conversation reset)[/dim]")
            continue
        if not text.strip():
            continue
        with console.status("thinking"):
            answer = chat.reply(text)
        console.print("[bold cyan]model[/bold cyan]: ", end="")
        console.print(answer, markup=False, highlight=False)  # the model's text as it is, no rich markup
