"""Everything that touches Flower's internals, in one place, pinned to Flower 1.39.

The apps (``aggregator`` and ``site_client``) use Flower's public API (``flwr.app``,
``flwr.clientapp``, ``flwr.serverapp``) directly. Whatever they need beyond it goes through this
package: the version pin (:mod:`.version`), the identity hooks of the in-process grid
(:mod:`.identity`), the object-pull backoff (:mod:`.backoff`), the Control API client and the
in-memory FAB builder of the ``flwr`` CLI (:mod:`.control_api`, :mod:`.fab_build`), and the
process handling that Flower's executables call for (:mod:`.processes`). docs/flower.md lists the
Flower facts these rely on; tests/core/test_flower_layer.py checks them against the installed
Flower, so an upgrade fails there, by name, first.

This package imports neither app; both may import it. Importing the package itself does not
import Flower.
"""
