"""Sphinx additions for the resnode book (loaded through _config.yml's ``local_extensions``).

- The bibliography is labelled like the text cites it, "Sander et al. 2022", not pybtex's alpha labels.
- Each script is included once per page: sphinx-thebe 0.3.1 adds its configuration script every time the
  environment is read, and a second ``const THEBE_JS_URL`` is a console error on every page.
"""

from pybtex.plugin import register_plugin
from pybtex.style.formatting.unsrt import Style as UnsrtStyle
from pybtex.style.labels import BaseLabelStyle


class AuthorYearLabels(BaseLabelStyle):
    """"Author 2022", "Author & Other 2022", "Author et al. 2022"; a letter is added where two coincide."""

    def format_labels(self, sorted_entries):
        labels = []
        for entry in sorted_entries:
            people = entry.persons.get("author") or entry.persons.get("editor") or []
            last = [" ".join(p.last_names) for p in people] or [entry.fields.get("title", entry.key)[:20]]
            names = last[0] if len(last) == 1 else f"{last[0]} & {last[1]}" if len(last) == 2 else f"{last[0]} et al."
            labels.append(f"{names} {entry.fields.get('year', '')}".strip())
        for label in labels:
            if labels.count(label) > 1:
                same = [i for i, other in enumerate(labels) if other == label]
                for letter, i in zip("abcdefghijklmnopqrstuvwxyz", same):
                    labels[i] = f"{label}{letter}"
        yield from labels


class AuthorYearStyle(UnsrtStyle):
    default_label_style = AuthorYearLabels
    default_sorting_style = "author_year_title"


register_plugin("pybtex.style.formatting", "resnode_authoryear", AuthorYearStyle)


def _one_of_each_script(app, pagename, templatename, context, doctree):
    scripts, seen = [], set()
    for script in context.get("script_files", []):
        # the same script may come once with filename None and once with "" (a body-only script)
        key = (getattr(script, "filename", str(script)) or "",
               tuple(sorted((k, str(v)) for k, v in getattr(script, "attributes", {}).items())))
        if key not in seen:
            seen.add(key)
            scripts.append(script)
    context["script_files"] = scripts


def setup(app):
    app.connect("html-page-context", _one_of_each_script, priority=900)  # after the themes add theirs
    return {"parallel_read_safe": True, "parallel_write_safe": True}
