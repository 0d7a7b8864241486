"""The hardware doctor's machinery: probe the machine, estimate a recipe's training memory, judge the recipe against
the machine. `recipe doctor` (runner/hardware/doctor.py) runs it and prints what it finds; nothing here prints.

    probe.py        the machine: Machine/Gpu, probe() (CPU, RAM, disk, CUDA, bitsandbytes, ONNX Runtime providers;
                    nvidia-smi through runner.hardware.platform_facts), hardware profiles (load_profile, profile_names,
                    ProfileError; the files are in runner/profiles)
    shapes.py       the model from its config alone: model_config (hub, cache, folder, model.init, bundled copies in
                    runner/model_configs), model_shape (ModelShape, Linear), SITES, NotEstimated, ModelMismatch
    estimate.py     peak training memory: Estimate, estimate(); its docstring explains the method
    activations.py  the bytes autograd saves for backward per token (the estimate's steps 3 and 4)
    verdict.py      check(): Verdict and Findings (requirements, methods, memory, disk, export/quantize RAM)
    remedies.py     what to change when memory does not fit: Remedy, propose_remedies()

Import the modules themselves; this file imports nothing, so importing the package stays cheap.
"""
