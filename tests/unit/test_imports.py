import subprocess
import sys


def test_import_ncd_does_not_import_ray():
    code = ("import sys, ncd, ncd.config, ncd.io, ncd.catalog, ncd.preprocess, ncd.mebin, ncd.crops, ncd.metrics;"
            "import pkgutil, importlib;"
            "[importlib.import_module(m.name) for m in pkgutil.walk_packages(ncd.__path__, 'ncd.')];"
            "print('ray' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stderr
