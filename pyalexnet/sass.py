"""Static facts of every kernel from the CUDA build's machine code (SASS): what `pyalexnet profile` reads.

For each kernel of ``pyalexnet._cuda`` at one architecture (sm_90, sm_80, ...): registers, static shared memory,
stack and spills (``cuobjdump -res-usage``) and the instruction mix (``cuobjdump -sass``) of the whole kernel and
of its hot loop, per iteration. Loops are found from backward branches; the hot loop is the innermost loop with
the most FFMA/HMMA (a kernel without them: the innermost loop with the most memory instructions). No GPU is needed:
cuobjdump reads the fatbinary inside the module. It comes with the CUDA toolkit, or, where the toolkit lacks
it, from the ``nvidia-cuda-cuobjdump`` and ``nvidia-cuda-nvdisasm`` wheels (dependencies of this package on Linux).
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

# Instruction classes, by opcode (the part before the first dot) or by opcode and width.
CLASSES = ["FFMA", "FP32 other", "HMMA", "LDS", "LDS.64", "LDS.128", "STS", "STS.128", "LDG", "LDG.128", "STG",
           "STG.128", "LDGSTS", "ATOM/RED", "BAR", "integer", "division", "branch", "other"]
_FP32 = {"FADD", "FMUL", "FMNMX", "FSETP", "FSEL", "MUFU", "FCHK", "FSET", "FSWZADD"}
_INTEGER = {"IMAD", "IADD3", "IADD", "LEA", "SHF", "SHL", "SHR", "LOP3", "LOP", "ISETP", "IABS", "IMNMX", "SEL",
            "VIADD", "VIMNMX", "I2F", "F2I", "POPC", "FLO", "BREV", "PRMT", "IMUL", "UIADD3", "UIMAD", "ULEA",
            "USHF", "ULOP3", "UISETP", "USEL", "UMOV", "MOV", "S2R", "S2UR", "CS2R", "LDC", "ULDC",
            "IDP", "BMSK", "UPRMT", "UFLO", "UPOPC", "ISCADD", "I2I", "F2F", "P2R", "R2P", "PLOP3", "UPLOP3",
            "VOTE", "VOTEU", "SHFL", "R2UR", "FRND"}
_BRANCH = {"BRA", "BRX", "EXIT", "RET", "CALL", "BSSY", "BSYNC", "WARPSYNC", "JMP", "JMX", "NOP", "YIELD",
           "BREAK", "BPT"}
_MEMORY = {"LDS", "LDS.64", "LDS.128", "STS", "STS.128", "LDG", "LDG.128", "STG", "STG.128", "LDGSTS", "ATOM/RED"}


def _width(op: str) -> str:
    for w in (".128", ".64"):
        if w in op:
            return w
    return ""


def classify(op: str) -> str:
    """The class of one opcode with its modifiers, e.g. 'LDG.E.128.CONSTANT' -> 'LDG.128'."""
    base = op.split(".")[0]
    if base == "FFMA":
        return "FFMA"
    if base in _FP32:
        return "FP32 other"
    if base in ("HMMA", "HGMMA"):
        return "HMMA"
    if base in ("LDS", "LDSM"):
        return {"": "LDS", ".64": "LDS.64", ".128": "LDS.128"}[_width(op)]
    if base == "STS":
        return "STS.128" if _width(op) == ".128" else "STS"
    if base == "LDG":
        return "LDG.128" if _width(op) == ".128" else "LDG"
    if base == "STG":
        return "STG.128" if _width(op) == ".128" else "STG"
    if base == "LDGSTS":
        return "LDGSTS"
    if base in ("ATOM", "ATOMG", "RED", "ATOMS"):
        return "ATOM/RED"
    if base in ("BAR", "MEMBAR", "DEPBAR"):
        return "BAR"
    if base in _BRANCH:
        return "branch"
    if base in _INTEGER:
        return "integer"
    return "other"


@dataclass
class Loop:
    start: int
    end: int                      # the address of the backward branch (inclusive)
    instructions: int = 0
    mix: dict = field(default_factory=dict)

    @property
    def memory(self) -> int:
        return sum(self.mix.get(c, 0) for c in _MEMORY)


@dataclass
class KernelFacts:
    name: str
    registers: int = 0
    static_shared: int = 0
    stack: int = 0
    local: int = 0                # bytes of local memory per thread (spills and local arrays)
    instructions: int = 0
    mix: dict = field(default_factory=dict)
    loops: list = field(default_factory=list)
    hot_loop: Loop | None = None
    # The smallest loop around the hot loop, as the part of it outside the hot loop (its instructions and mix): a
    # tile engine whose k loop is not unrolled has its global loads and shared stores here, once per slice.
    outer_loop: Loop | None = None
    straight: int = 0             # instructions outside every loop

    def as_dict(self) -> dict:
        hot = self.hot_loop
        outer = self.outer_loop
        return {"registers": self.registers, "static_shared": self.static_shared, "stack": self.stack,
                "spills": self.local, "instructions": self.instructions, "mix": self.mix, "loops": len(self.loops),
                "hot_loop": None if hot is None else {"start": hex(hot.start), "end": hex(hot.end),
                                                      "instructions": hot.instructions, "mix": hot.mix},
                "outer_loop": None if outer is None else {"start": hex(outer.start), "end": hex(outer.end),
                                                          "instructions": outer.instructions, "mix": outer.mix}}


class SassUnavailable(RuntimeError):
    """The SASS cannot be read here (no CUDA build, or no cuobjdump)."""


def find_cuobjdump() -> str:
    """cuobjdump next to nvcc, on PATH, or from the nvidia-cuda-cuobjdump wheel (which needs nvdisasm beside it)."""
    candidates = []
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home:
            candidates.append(Path(home) / "bin" / "cuobjdump")
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(Path(os.path.realpath(nvcc)).parent / "cuobjdump")
    which = shutil.which("cuobjdump")
    if which:
        candidates.append(Path(which))
    spec = importlib.util.find_spec("nvidia")
    if spec is not None and spec.submodule_search_locations:
        for root in spec.submodule_search_locations:
            candidates += sorted(Path(root).glob("cu*/bin/cuobjdump"), reverse=True)
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK) and ((c.parent / "nvdisasm").is_file() or shutil.which("nvdisasm")):
            return str(c)
    raise SassUnavailable("cuobjdump (with nvdisasm) not found: install the CUDA toolkit, or "
                          "pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm")


def cuda_module_path() -> str:
    """The file of pyalexnet._cuda (not imported: it needs no GPU to be read)."""
    spec = importlib.util.find_spec("pyalexnet._cuda")
    if spec is None or not spec.origin:
        raise SassUnavailable("pyalexnet._cuda was not built (no nvcc at install time): the profile reads the SASS "
                              "of the CUDA build; install the CUDA toolkit and reinstall pyalexnet")
    return spec.origin


def _run(tool: str, *args) -> str:
    env = dict(os.environ)
    env["PATH"] = str(Path(tool).parent) + os.pathsep + env.get("PATH", "")
    r = subprocess.run([tool, *args], capture_output=True, text=True, env=env, check=False)
    if r.returncode != 0:
        raise SassUnavailable(f"{Path(tool).name} {' '.join(args[:-1])} failed: {r.stderr.strip()[:500]}")
    return r.stdout


_FUNC_RES = re.compile(r"^\s*Function (\S+):\s*$")
_RES = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")
_FUNC_SASS = re.compile(r"^\s*Function : (\S+)\s*$")
_INSTR = re.compile(r"^\s+/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")
_TARGET = re.compile(r"(0x[0-9a-f]+)\s*$")


def parse(res_usage: str, sass: str) -> dict[str, KernelFacts]:
    """Kernel name -> facts, from cuobjdump's -res-usage and -sass output for one architecture."""
    facts: dict[str, KernelFacts] = {}
    current = None
    for line in res_usage.splitlines():
        m = _FUNC_RES.match(line)
        if m:
            current = facts.setdefault(m.group(1), KernelFacts(m.group(1)))
            continue
        m = _RES.search(line)
        if m and current is not None:
            current.registers, current.stack, current.static_shared, current.local = (
                int(m.group(1)), int(m.group(2)), int(m.group(3)), int(m.group(4)))
            current = None
    bodies: dict[str, list] = {}
    body = None
    for line in sass.splitlines():
        m = _FUNC_SASS.match(line)
        if m:
            body = bodies.setdefault(m.group(1), [])
            continue
        m = _INSTR.match(line)
        if m and body is not None:
            body.append((int(m.group(1), 16), m.group(2), m.group(3)))
    for name, instrs in bodies.items():
        k = facts.setdefault(name, KernelFacts(name))
        _analyse(k, instrs)
    return facts


def _analyse(k: KernelFacts, instrs: list) -> None:
    classes = [classify(op) for _, op, _ in instrs]
    # The integer division idiom (an I2F.*.RP reciprocal estimate, then MUFU.RCP and a correction): one sequence.
    division = [op.startswith("I2F") and ".RP" in op for _, op, _ in instrs]
    k.instructions = len(instrs)
    k.mix = _count(classes, division, range(len(instrs)))
    loops = []
    for i, (addr, op, rest) in enumerate(instrs):
        if op.split(".")[0] != "BRA":
            continue
        t = _TARGET.search(rest.strip())
        if not t:
            continue
        target = int(t.group(1), 16)
        if target < addr:  # (a branch to itself is the padding spin after the last EXIT, not a loop)
            loops.append(Loop(target, addr))
    # Several back edges to one header (a `continue`) are one loop, up to the last of them.
    merged = {}
    for lp in loops:
        if lp.start not in merged or lp.end > merged[lp.start].end:
            merged[lp.start] = lp
    loops = list(merged.values())
    index = {addr: i for i, (addr, _, _) in enumerate(instrs)}
    in_loop = [False] * len(instrs)
    for loop in loops:
        lo, hi = index.get(loop.start), index.get(loop.end)
        if lo is None or hi is None:
            continue
        loop.instructions = hi - lo + 1
        loop.mix = _count(classes, division, range(lo, hi + 1))
        for i in range(lo, hi + 1):
            in_loop[i] = True
    k.loops = [lp for lp in loops if lp.instructions]
    k.straight = in_loop.count(False)
    innermost = [a for a in k.loops if not any(b is not a and a.start <= b.start and b.end <= a.end and
                                               (b.start, b.end) != (a.start, a.end) for b in k.loops)]
    if innermost:
        hot = k.hot_loop = max(innermost, key=lambda lp: (lp.mix.get("FFMA", 0) + lp.mix.get("HMMA", 0), lp.memory,
                                                           lp.instructions))
        around = [a for a in k.loops if a is not hot and a.start <= hot.start and hot.end <= a.end]
        if around:
            outer = min(around, key=lambda lp: lp.instructions)
            mix = {c: outer.mix.get(c, 0) - hot.mix.get(c, 0) for c in outer.mix}
            k.outer_loop = Loop(outer.start, outer.end, outer.instructions - hot.instructions,
                                {c: n for c, n in mix.items() if n > 0})


def _count(classes, division, indices) -> dict:
    mix = {}
    for i in indices:
        mix[classes[i]] = mix.get(classes[i], 0) + 1
        if division[i]:
            mix["division"] = mix.get("division", 0) + 1
    return {c: mix[c] for c in CLASSES if c in mix}


_CACHE: dict = {}


def kernel_facts(arch: str = "sm_90", module: str | None = None) -> dict[str, KernelFacts]:
    """Facts of every kernel in the CUDA module (default: pyalexnet._cuda) for `arch`, cached per file version."""
    path = module or cuda_module_path()
    st = os.stat(path)
    key = (path, st.st_mtime_ns, st.st_size, arch)
    if key not in _CACHE:
        tool = find_cuobjdump()
        res = _run(tool, "-res-usage", "-arch", arch, path)
        sass = _run(tool, "-sass", "-arch", arch, path)
        facts = parse(res, sass)
        if not facts:
            raise SassUnavailable(f"{path} holds no {arch} machine code (built with CUDAARCHS without {arch[3:]}?)")
        _CACHE[key] = facts
    return _CACHE[key]
