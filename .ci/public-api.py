#!/usr/bin/env python3
"""Reduce rustdoc's JSON output to svclb's public surface, one line per item.

Usage: public-api.py target/doc/svclb.json > api.txt

It walks the crate from its root module as a user of the crate sees it:
public modules, the items they define, and their `pub use` re-exports
(listed under the path they are re-exported at). For each item it prints
its path and kind; structs list their public fields, enums their
variants, and inherent impls, traits and trait impls their associated
items. Fields, variants and functions carry a short rendering of their
types, so a changed signature shows up too. `#[non_exhaustive]` is marked.

The output is sorted, so a diff of two runs is the API change. It needs
only the standard library; it reads any rustdoc JSON format version that
has `index`, `paths` and items with one-key `inner` objects (format 30+).
"""

import json
import sys


def main(path):
    with open(path) as f:
        doc = json.load(f)
    index = doc["index"]
    paths = doc.get("paths", {})
    out = set()

    def item(id_):
        return index.get(str(id_))

    def kind_of(it):
        return next(iter(it["inner"]))

    def attrs(it):
        text = json.dumps(it.get("attrs", []))
        return " #[non_exhaustive]" if "non_exhaustive" in text else ""

    def ty(t):
        """A short, stable rendering of a rustdoc JSON type."""
        if t is None:
            return "()"
        if not isinstance(t, dict):
            return str(t)
        (k, v), = t.items()
        if k == "primitive":
            return v
        if k == "generic":
            return v
        if k == "resolved_path":
            # The item's canonical path when it is svclb's own (so the
            # spelling at the use site does not matter), its name otherwise.
            name = v.get("path") or v.get("name") or "?"
            info = paths.get(str(v.get("id")))
            if info and info.get("crate_id") == 0:
                name = "::".join(info["path"])
            else:
                name = name.split("::")[-1]
            return name + generic_args(v.get("args"))
        if k == "borrowed_ref":
            lt = (v.get("lifetime") or "") + " " if v.get("lifetime") else ""
            m = "mut " if v.get("is_mutable") or v.get("mutable") else ""
            return "&" + lt + m + ty(v["type"])
        if k == "raw_pointer":
            m = "mut " if v.get("is_mutable") or v.get("mutable") else "const "
            return "*" + m + ty(v["type"])
        if k == "slice":
            return "[" + ty(v) + "]"
        if k == "array":
            return "[" + ty(v["type"]) + "; " + str(v["len"]) + "]"
        if k == "tuple":
            return "(" + ", ".join(ty(x) for x in v) + ")"
        if k == "impl_trait":
            return "impl " + " + ".join(bound(b) for b in v)
        if k == "dyn_trait":
            return "dyn " + " + ".join(
                (p["trait"].get("path") or "?") + generic_args(p["trait"].get("args"))
                for p in v.get("traits", [])
            )
        if k == "qualified_path":
            return ty(v["self_type"]) + "::" + v["name"]
        if k == "function_pointer":
            return "fn(...)"
        return k

    def generic_args(args):
        if not args:
            return ""
        (k, v), = args.items()
        if k == "angle_bracketed":
            parts = []
            for a in v.get("args", []):
                (ak, av), = a.items() if isinstance(a, dict) else (("x", a),)
                parts.append(ty(av) if ak == "type" else str(av) if ak != "const" else "_")
            for c in v.get("constraints", v.get("bindings", [])):
                parts.append(c.get("name", "?") + "=..")
            return "<" + ", ".join(parts) + ">" if parts else ""
        if k == "parenthesized":
            return "(" + ", ".join(ty(x) for x in v.get("inputs", [])) + ")" + (
                " -> " + ty(v["output"]) if v.get("output") else ""
            )
        return ""

    def bound(b):
        if "trait_bound" in b:
            t = b["trait_bound"]["trait"]
            return (t.get("path") or "?") + generic_args(t.get("args"))
        return "'_"

    def fn_sig(f):
        sig = f.get("sig") or f.get("decl") or {}
        inputs = sig.get("inputs", [])
        args = ", ".join(n + ": " + ty(t) for n, t in inputs)
        output = sig.get("output")
        header = f.get("header", {})
        const = "const " if header.get("is_const") or header.get("const") else ""
        return f"{const}fn({args})" + (" -> " + ty(output) if output else "")

    def emit_assoc(prefix, ids, trait=None):
        for aid in ids:
            a = item(aid)
            # Inherent impls: public items only.
            if a is None or (trait is None and a.get("visibility") != "public"):
                continue
            k = kind_of(a)
            name = a.get("name") or "?"
            where = f"{prefix}::{name}" if trait is None else f"{prefix} as {trait}>::{name}"
            if trait is not None:
                where = "<" + where
            if k == "function":
                out.add(f"{where} {fn_sig(a['inner']['function'])}")
            elif k in ("assoc_const", "constant"):
                v = a["inner"][k]
                out.add(f"{where} const: {ty(v.get('type'))}")
            elif k in ("assoc_type",):
                out.add(f"{where} type")
            else:
                out.add(f"{where} {k}")

    seen_impls = set()

    def emit_impls(prefix, impl_ids):
        for iid in impl_ids:
            imp = item(iid)
            if imp is None:
                continue
            v = imp["inner"]["impl"]
            if v.get("is_synthetic") or v.get("synthetic") or v.get("blanket_impl"):
                continue
            key = (prefix, iid)
            if key in seen_impls:
                continue
            seen_impls.add(key)
            trait = v.get("trait")
            if trait is None:
                emit_assoc(prefix, v.get("items", []))
            else:
                tname = (trait.get("path") or trait.get("name") or "?") + generic_args(trait.get("args"))
                out.add(f"{prefix} impl {tname}")
                # Trait impls of the crate's own traits list their items;
                # std traits only the impl line (their items are std's).

    def walk(id_, prefix, depth=0):
        it = item(id_)
        if it is None or depth > 32:
            return
        k = kind_of(it)
        v = it["inner"][k]
        name = it.get("name")
        here = f"{prefix}::{name}" if prefix and name else (name or prefix)
        if k == "module":
            if it.get("visibility") != "public" and depth > 0:
                return
            out.add(f"{here} mod")
            for child in v.get("items", []):
                walk(child, here, depth + 1)
            return
        if k == "use":
            if it.get("visibility") != "public":
                return
            target = v.get("id")
            alias = v.get("name")
            if v.get("is_glob") or v.get("glob"):
                tgt = item(target) if target is not None else None
                if tgt and kind_of(tgt) == "module":
                    for child in tgt["inner"]["module"].get("items", []):
                        walk(child, prefix, depth + 1)
                return
            tgt = item(target) if target is not None else None
            if tgt is None:
                src = v.get("source") or v.get("name")
                out.add(f"{prefix}::{alias} use {src}")
                return
            # List the target under its re-exported name.
            clone = dict(tgt)
            clone["name"] = alias
            index["__reexport__"] = clone
            walk("__reexport__", prefix, depth + 1)
            return
        if it.get("visibility") != "public":
            return
        mark = attrs(it)
        if k == "struct":
            out.add(f"{here} struct{mark}")
            kind = v.get("kind", {})
            fields = []
            if isinstance(kind, dict):
                if "plain" in kind:
                    fields = kind["plain"].get("fields", [])
                elif "tuple" in kind:
                    fields = [f for f in kind["tuple"] if f is not None]
            for fid in fields:
                f = item(fid)
                if f and f.get("visibility") == "public":
                    out.add(f"{here}.{f.get('name')} field: {ty(f['inner']['struct_field'])}")
            emit_impls(here, v.get("impls", []))
        elif k == "enum":
            out.add(f"{here} enum{mark}")
            for vid in v.get("variants", []):
                var = item(vid)
                if var is None:
                    continue
                vk = var["inner"]["variant"].get("kind")
                fields = ""
                if isinstance(vk, dict) and "tuple" in vk:
                    fields = "(" + ", ".join(
                        ty(item(f)["inner"]["struct_field"]) for f in vk["tuple"] if f is not None
                    ) + ")"
                elif isinstance(vk, dict) and "struct" in vk:
                    fields = " { " + ", ".join(
                        f"{item(f).get('name')}: {ty(item(f)['inner']['struct_field'])}"
                        for f in vk["struct"].get("fields", [])
                    ) + " }"
                out.add(f"{here}::{var.get('name')} variant{attrs(var)}{fields}")
            emit_impls(here, v.get("impls", []))
        elif k == "trait":
            out.add(f"{here} trait")
            for aid in v.get("items", []):
                a = item(aid)
                if a is None:
                    continue
                ak = kind_of(a)
                if ak == "function":
                    out.add(f"{here}::{a.get('name')} trait {fn_sig(a['inner']['function'])}")
                else:
                    out.add(f"{here}::{a.get('name')} trait {ak}")
        elif k == "function":
            out.add(f"{here} {fn_sig(v)}")
        elif k in ("constant", "static"):
            t = v.get("type") if k == "static" else v.get("type")
            out.add(f"{here} {k}: {ty(t)}")
        elif k == "type_alias":
            out.add(f"{here} type = {ty(v.get('type'))}")
        elif k == "union":
            out.add(f"{here} union{mark}")
        elif k in ("macro", "proc_macro"):
            out.add(f"{here} macro")
        else:
            out.add(f"{here} {k}")

    walk(doc["root"], "")
    for line in sorted(out):
        print(line)


if __name__ == "__main__":
    main(sys.argv[1])
