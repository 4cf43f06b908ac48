"""The XPU lane: every launch configuration the planners emit for ``device_type="xpu"``,
compiled by Intel's Triton backend to SPIR-V, to PVC and DG2 machine code by ``ocloc``, and run
on Intel's OpenCL CPU runtime against the reference (see ``docs/xpu.md``).

``configs`` (project Python: torch and rope_compile) lists the configurations and the run
cases; ``worker`` (the lane's own venv: triton-xpu, no torch) compiles and runs them; ``run``
ties the two together and is what ``.ci/xpu_lane.sh`` calls.
"""
