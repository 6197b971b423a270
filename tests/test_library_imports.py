import subprocess
import sys

LIBRARY = [
    "flows", "flows.core", "flows.distributions", "flows.metrics", "flows.plots",
    "flows.bijections.coupling", "flows.bijections.normalization", "flows.bijections.permutation",
    "flows.bijections.residual", "flows.nn.mlp", "flows.nn.lipschitz", "flows.models.realnvp",
    "flows.models.iresnet", "flows.data.toy", "flows.data.entropy",
    "flows.bijections.elementwise", "flows.bijections.reshape", "flows.bijections.conv",
    "flows.nn.conv", "flows.nn.lipschitz_conv", "flows.models.multiscale", "flows.data.images",
    "flows.evaluation", "flows.diagnostics", "flows.compiled_step", "flows.flat_adam_state",
]


def test_library_imports_without_lightning_or_hydra_or_the_compiler():
    """The library needs no training glue, and its compiled paths load torch's compiler stack
    (seconds of imports) only when first called."""
    code = (
        "import importlib, sys\n"
        f"for name in {LIBRARY!r}: importlib.import_module(name)\n"
        "glue = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('lightning', 'pytorch_lightning', 'hydra', 'omegaconf'))\n"
        "assert not glue, glue\n"
        "compiler = sorted(m for m in sys.modules if m.startswith(('torch._dynamo', "
        "'torch._inductor')))\n"
        "assert not compiler, compiler\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
