"""How `--help` reads: flags shown as flags, arguments as TEACHER STUDENT, and examples under every command."""

from __future__ import annotations

from typer.core import TyperArgument, TyperCommand, TyperGroup

EXAMPLES = {
    "distill": ["kdcli distill teacher/ resnet18 --data data/ --out run1",
                "kdcli distill teacher/ resnet18 -d data/ -o run1 --baseline baseline/ --min-top1 80 --export onnx",
                "kdcli distill teacher/ resnet18 -d data/ -o run1 --resume"],
    "ablate": ["kdcli ablate teacher/ resnet18 --data data/ --out ablation --seeds 3",
               "kdcli ablate teacher/ resnet18 -d data/ --teacher teacher2/ --cells alone,kd,joint,multi-teacher"],
    "train": ["kdcli train resnet50 --data data/ --epochs 30 --out teacher",
              "kdcli train resnet18 -d data/ --epochs 30 -o baseline --log tensorboard"],
    "eval": ["kdcli eval run1/student --data data/ --teacher teacher/ --out eval1",
             "kdcli eval run1/student --data data/ --split test --min-top1 80 --json",
             "kdcli eval run1/export/model.int8.onnx --data held-out/"],
    "export": ["kdcli export run1/student --format onnx,int8 --data data/ --out exported"],
    "demo": ["kdcli demo", "kdcli demo --out demo --student test_efficientnet"],
    "convert": ["kdcli convert output/train/model_best.pth.tar --out teacher",
                "kdcli convert lightning.ckpt --arch resnet50 --prefix model. --out teacher"],
    "recipe validate": ["kdcli recipe validate my-recipe.yaml", "kdcli recipe validate smskd --set stages.0.epochs=3"],
    "recipe show": ["kdcli recipe show smskd", "kdcli recipe show my-recipe.yaml --set optimizer.lr=0.01"],
    "recipe list": ["kdcli recipe list"],
    "recipe schema": ["kdcli recipe schema > recipe.schema.json"],
    "methods": ["kdcli methods", "kdcli methods --json"],
    "inspect": ["kdcli inspect resnet18", "kdcli inspect teacher/ --image-size 224"],
}


def examples(command: str) -> str:
    """The epilog of a command's help: its examples as a code block (the help is rendered as Markdown)."""
    lines = "\n".join(EXAMPLES[command])
    return f"**Examples**\n\n```\n{lines}\n```\n\n-q/--quiet, -v/--verbose and --debug are accepted after any command."


def _readable(params: list) -> list:
    """A boolean flag takes no value: no `<bool>` beside it; an argument is named in capitals, as in the usage."""
    for param in params:
        if getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""
        elif isinstance(param, TyperArgument) and param.metavar is None:
            param.metavar = param.name.upper()
    return params


class Command(TyperCommand):
    """A command whose usage line names its arguments as TEACHER STUDENT (typer writes {teacher} {student})."""

    def get_params(self, ctx):
        return _readable(super().get_params(ctx))

    def collect_usage_pieces(self, ctx) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if isinstance(param, TyperArgument):
                name = param.metavar
                pieces.append((name if param.required else f"[{name}]") + ("..." if param.nargs != 1 else ""))
        return pieces


class Group(TyperGroup):
    def get_params(self, ctx):
        return _readable(super().get_params(ctx))
