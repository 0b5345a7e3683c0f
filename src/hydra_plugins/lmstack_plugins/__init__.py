"""lmstack plug-ins' own config folders on Hydra's search path (Hydra finds search-path plug-ins
only in the hydra_plugins package): each plug-in module's `conf/` (lmstack.config.plugins)."""

from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin


class LmstackPluginConfigs(SearchPathPlugin):
    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        from lmstack.config.plugins import plugin_conf_dirs

        for folder in plugin_conf_dirs():
            search_path.append(provider="lmstack-plugin", path=f"file://{folder}")
