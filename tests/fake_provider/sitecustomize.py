"""Test shim for the autoscaling cluster of tests/test_multinode.py, on PYTHONPATH of that cluster's processes only.

Ray's autoscaler merges a provider's config with the provider's defaults file; for the fake local provider that file
(ray/autoscaler/_private/fake_multi_node/example.yaml) is not in the Ray wheel. This points the fake provider's
defaults at the complete config the test writes (ZERAY_FAKE_PROVIDER_DEFAULTS), once the autoscaler imports its
provider table. Nothing else is touched.
"""

import importlib.abc
import importlib.util
import os
import sys

_MODULE = "ray.autoscaler._private.providers"


class _PatchProviders(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != _MODULE:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        load = spec.loader.exec_module

        def exec_module(module):
            load(module)
            module._DEFAULT_CONFIGS["fake_multinode"] = lambda: os.environ["ZERAY_FAKE_PROVIDER_DEFAULTS"]

        spec.loader.exec_module = exec_module
        return spec


if os.environ.get("ZERAY_FAKE_PROVIDER_DEFAULTS"):
    sys.meta_path.insert(0, _PatchProviders())
