"""Explicit activation file for ``--external_plugins "$(swift-gkd plugin-path)"``.

It lives alone in its directory because ms-swift puts the plugin file's directory on ``sys.path``.
"""
from swift_gkd_plugin.entry.activation import activate_from_external_plugin

activate_from_external_plugin()
