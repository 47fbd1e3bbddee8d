# Sourced by scripts/demo and scripts/test: find Python 3.12+, create .venv, install the project.
# Quiet when it succeeds; on failure it prints what went wrong and what to install.

NHI_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
NHI_VENV="${NHI_VENV:-$NHI_ROOT/.venv}"

nhi_python_ok() {
  "$1" -c 'import sys, venv, ensurepip; sys.exit(0 if sys.version_info >= (3, 12) else 1)' >/dev/null 2>&1
}

nhi_find_python() {
  local candidate
  if [ -n "${NHI_PYTHON:-}" ]; then
    if nhi_python_ok "$NHI_PYTHON"; then echo "$NHI_PYTHON"; return 0; fi
    echo "scripts: NHI_PYTHON=$NHI_PYTHON is not a Python 3.12+ with venv and ensurepip" >&2
    return 1
  fi
  for candidate in python3.13 python3.12 python3 python; do
    if command -v "$candidate" >/dev/null 2>&1 && nhi_python_ok "$(command -v "$candidate")"; then
      command -v "$candidate"; return 0
    fi
  done
  # pyenv keeps interpreters outside PATH unless they are selected: look there too.
  local root="${PYENV_ROOT:-}"
  if [ -z "$root" ] && command -v pyenv >/dev/null 2>&1; then root="$(pyenv root 2>/dev/null)"; fi
  [ -z "$root" ] && root="$HOME/.pyenv"
  for candidate in $(ls -d "$root"/versions/3.1[2-9]*/bin/python3 2>/dev/null | sort -rV) \
                   /usr/local/bin/python3.1[2-9] /usr/bin/python3.1[2-9]; do
    if [ -x "$candidate" ] && nhi_python_ok "$candidate"; then echo "$candidate"; return 0; fi
  done
  return 1
}

nhi_setup() {
  local stamp="$NHI_VENV/.nhi-installed" want
  # The C encoder is built at install (pip install -e): a changed source needs a new install too.
  want="$(cat "$NHI_ROOT/pyproject.toml" "$NHI_ROOT"/addons/nhi_gateway/*/*.c | sha256sum | cut -c1-16)"
  if [ -x "$NHI_VENV/bin/python" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    return 0
  fi
  local py
  if ! py="$(nhi_find_python)"; then
    cat >&2 <<MSG
scripts: no Python 3.12 or newer was found (with the venv and ensurepip modules).
  Install one, for example:
    Debian/Ubuntu:  apt-get install python3.12 python3.12-venv   (or python3.13, python3.13-venv)
    pyenv:          pyenv install 3.12
  or point NHI_PYTHON at one:  NHI_PYTHON=/path/to/python3.12 $0
MSG
    return 1
  fi
  local log="$NHI_ROOT/.venv-setup.log"
  if ! { [ -x "$NHI_VENV/bin/python" ] || "$py" -m venv "$NHI_VENV"; } >"$log" 2>&1 \
     || ! "$NHI_VENV/bin/python" -m pip install --disable-pip-version-check -q -e "$NHI_ROOT[test]" >>"$log" 2>&1; then
    echo "scripts: setting up $NHI_VENV with $py failed; the installer said:" >&2
    tail -n 30 "$log" >&2
    return 1
  fi
  echo "$want" >"$stamp"
  rm -f "$log"
}

# Debian's Chromium (and an emoji font, so mitmweb's marks show in screenshots) for the mitmweb
# end-to-end test. Installed when missing, only as root (CI, fresh machines); otherwise say how.
nhi_browser() {
  if command -v chromium >/dev/null 2>&1 \
     && dpkg-query -W -f='${Status}' fonts-noto-color-emoji 2>/dev/null | grep -q "ok installed"; then
    return 0
  fi
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    local log="$NHI_ROOT/.browser-setup.log"
    if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium fonts-noto-color-emoji; } >"$log" 2>&1; then
      echo "scripts: installing chromium failed; apt-get said:" >&2
      tail -n 20 "$log" >&2
      return 1
    fi
    rm -f "$log"
  else
    echo "scripts: the mitmweb test needs Debian's chromium: sudo apt-get install -y chromium fonts-noto-color-emoji" >&2
    return 1
  fi
}
