"""Open ``*_labels.tif`` with the plugin's reader without napari asking "Choose reader".

napari picks a reader by file-name pattern only: the plugin's ``*_labels.tif`` and napari's
own ``*.tif`` both match a ``cells_labels.tif``, so napari asks which one to use every
time. A reader preference (napari's *Preferences > Plugins > File extension readers*, the
same setting the dialog's "remember" box writes) settles it. The widgets add one for
``*_labels.tif`` / ``*_labels.tiff`` when they open, unless the user already chose a
reader for such files.
"""

from __future__ import annotations

from fnmatch import fnmatch

from napari.settings import get_settings
from napari.utils.notifications import show_info

PLUGIN = "napari-mobilesam"
PATTERNS = ("*_labels.tif", "*_labels.tiff")


def prefer_plugin_reader() -> list[str]:
    """Make the plugin the preferred reader of ``*_labels.tif`` files, where the user has
    no preference for them yet.

    Returns
    -------
    list of str
        The patterns added to napari's ``settings.plugins.extension2reader`` (empty when
        every pattern already had a preference, the user's own included: it is kept).
    """
    settings = get_settings()
    current = dict(settings.plugins.extension2reader)
    added = {}
    for pattern in PATTERNS:
        example = "image" + pattern[1:]  # image_labels.tif
        if any(fnmatch(example.lower(), chosen.lower()) for chosen in current):
            continue
        added[pattern] = PLUGIN
    if added:
        settings.plugins.extension2reader = {**current, **added}
        show_info(
            "MobileSAM: files named *_labels.tif now open as labels with its reader "
            "(Preferences > Plugins > File extension readers to change)"
        )
    return list(added)
