"""Tools built on the library: the ``svdquant`` command (:mod:`.cli`), the demo, the hub and calibration
commands, the quality report and the FLUX-shaped model builders. They import the library; the library
never imports them.
"""
