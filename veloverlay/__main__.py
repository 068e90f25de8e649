from veloverlay.cli import entry

entry()
