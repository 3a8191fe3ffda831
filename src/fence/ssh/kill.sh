U="@VM_UUIDS@"
N="@STORAGE_ADDRS@"
s=$(printf "\001")
f= r= b= me=
[ -r /proc/1/stat ] || { echo "rbdfence-kill error=no-proc"; exit 3; }
x=
read -r x 2>/dev/null </proc/2/comm
[ "$x" = kthreadd ] || { echo "rbdfence-kill error=pid-namespace"; exit 3; }
x=
read -r x 2>/dev/null <"/proc/$$/cmdline"
case $x in /bin/sh*) ;; *) echo "rbdfence-kill error=self-check"; exit 3 ;; esac
C=
for d in /proc/[0-9]*; do C="$C ${d#/proc/}"; done
ok=
if w=$(LC_ALL=C awk -v u="$U" -v me="$$" -f /dev/stdin $C 2>/dev/null <<\AWK
BEGIN {
  RS = "\0"
  n = split(u, w, " ")
  for (i = 1; i <= n; i++) want[w[i]] = 1
  if ((getline x < "/proc/0/cmdline") >= 0) exit 1
  ok = 0
  for (i = 1; i < ARGC; i++) {
    p = ARGV[i]
    f = "/proc/" p "/cmdline"
    c = 0; q = 0; s = 0; m = ""; prev = ""
    while ((e = (getline x < f)) > 0) {
      c++
      if (p == me) {
        if (c == 1) s = (index(x, "/bin/sh") == 1)
        else if (c == 2) s = s && x == "-c"
        else if (c == 3) s = s && index(x, "U=\"" u "\"\n") == 1
        continue
      }
      if (c > 1 && (prev == "-uuid" || prev == "--uuid")) {
        nv = 1; vs[1] = x
      } else if (c > 1 && (prev == "-smbios" || prev == "--smbios")) {
        nv = 0; nf = split(x, fs, ",")
        for (j = 1; j <= nf; j++) if (substr(fs[j], 1, 5) == "uuid=") vs[++nv] = substr(fs[j], 6)
      } else nv = 0
      for (j = 1; j <= nv; j++) {
        if (vs[j] ~ /[^0-9A-Fa-f-]/) continue
        v = tolower(vs[j])
        if (v in want) {
          if (m == "") m = v
          else if (m != v) m = "-"
        }
      }
      prev = x
    }
    close(f)
    if (p == me) ok = (e == 0 && s && c == 3)
    else if (e < 0) print p, "?"
    else if (m != "") print p, m
  }
  if (!ok) exit 1
  print "end"
  exit 0
}
AWK
); then
  ok=1 ae= as= af= ar= ab=
  ifs=$IFS; IFS="
"; set -f
  for l in $w; do
    [ -z "$ae" ] || { ok=; break; }
    if [ "$l" = end ]; then ae=1; continue; fi
    case $l in [0-9]*" "?*) ;; *) ok=; break ;; esac
    p=${l%% *} v=${l#* }
    case $p in *[!0-9]*) ok=; break ;; esac
    case $v in *" "*) ok=; break ;; esac
    case " $C " in *" $p "*) ;; *) ok=; break ;; esac
    case "$as " in *" $p "*) ok=; break ;; esac
    [ "$p" != "$$" ] || { ok=; break; }
    as="$as $p"
    case $v in
      -) ab="$ab $p"; ar="$ar $p" ;;
      "?") [ -d "/proc/$p" ] && ar="$ar $p" ;;
      *) case " $U " in *" $v "*) af="$af $p:$v" ;; *) ok=; break ;; esac ;;
    esac
  done
  IFS=$ifs; set +f
  [ -n "$ae" ] || ok=
fi
if [ -n "$ok" ]; then
  f="$f$af"; r="$r$ar"; b="$b$ab"; me=1 C=
fi
mt() {
  case $1 in ""|*" "*) return 0 ;; esac
  case " $U " in
    *" $1 "*) if [ -z "$m" ]; then m=$1; elif [ "$m" != "$1" ]; then m=-; fi ;;
  esac
}
for p in $C; do
  d=/proc/$p
  if ! c=$(tr "\000\001\nABCDEF" "\001\002\002abcdef" 2>/dev/null <"$d/cmdline"); then
    [ -d "$d" ] && r="$r $p"
    continue
  fi
  if [ "$p" = "$$" ]; then
    case $c in *"$U"*) me=1 ;; esac
    continue
  fi
  [ -n "$c" ] || continue
  ifs=$IFS; IFS=$s; set -f; set -- $c; set +f; IFS=$ifs
  m=
  while [ $# -gt 1 ]; do
    case $1 in
      -uuid|--uuid) mt "$2" ;;
      -smbios|--smbios)
        ifs=$IFS; IFS=,; set -f
        for kv in $2; do case $kv in uuid=*) mt "${kv#uuid=}" ;; esac; done
        set +f; IFS=$ifs
        ;;
    esac
    shift
  done
  case $m in
    "") ;;
    -) b="$b $p"; r="$r $p" ;;
    *) f="$f $p:$m" ;;
  esac
done
[ -n "$me" ] || { echo "rbdfence-kill error=self-check"; exit 3; }
nx=
for e in $f; do
  p=${e%%:*}
  [ -d "/proc/$p" ] || continue
  [ "/proc/$p/ns/net" -ef "/proc/$$/ns/net" ] || nx=1
done
k=
for e in $f; do kill -s KILL "${e%%:*}" 2>/dev/null && k="$k $e"; done
for p in $b; do kill -s KILL "$p" 2>/dev/null; done
live() {
  a=
  for e in $f $r; do
    p=${e%%:*}
    [ -d "/proc/$p" ] || continue
    if read -r l 2>/dev/null <"/proc/$p/stat"; then
      l=${l##*") "}
      case ${l%% *} in Z|X) ;; *) a="$a $p"; continue ;; esac
    fi
    z=1 n=0
    for t in /proc/$p/task/*; do
      if read -r l 2>/dev/null <"$t/stat"; then
        n=$((n+1)); l=${l##*") "}
        case ${l%% *} in Z|X) ;; *) z=0; break ;; esac
      elif [ -e "$t" ]; then
        z=0; break
      fi
    done
    [ "$n" -gt 0 ] || { [ -d "/proc/$p" ] && z=0; }
    [ "$z" = 1 ] || a="$a $p"
  done
}
live
i=0 j=0
while [ -n "$a" ] && [ "$i" -lt 40 ]; do
  if [ "$j" -lt 5 ]; then
    j=$((j+1))
    sleep 0.01 2>/dev/null || { sleep 1; i=$((i+20)); }
    [ "$j" -lt 5 ] || i=$((i+1))
  else
    sleep 0.05 2>/dev/null || { sleep 1; i=$((i+19)); }
    i=$((i+1))
  fi
  live
done
sk=
sweep() {
  sk=0
  for n in $N; do
    o=$(ss -tne state fin-wait-1 state closing state last-ack src "$n" 2>/dev/null) || return 1
    ifs=$IFS; IFS="
"; set -f
    for l in $o; do
      case " $l " in *" ino:0 "*) ;; *) continue ;; esac
      IFS=$ifs; set -- $l; IFS="
"
      sk=$((sk+1))
      [ -z "$kq" ] || [ $# -lt 5 ] || ss -K -tn state fin-wait-1 state closing state last-ack src "$4" dst "$5" >/dev/null 2>&1
    done
    IFS=$ifs; set +f
  done
}
if [ -z "$N" ]; then
  sa=0 sk=0
elif [ -n "$nx" ] || ! command -v ss >/dev/null 2>&1; then
  sa=? sk=?
else
  kq=1
  if sweep; then sa=$sk; else sa=? sk=?; fi
  kq=
  if [ "$sa" != "?" ] && [ "$sa" -gt 0 ]; then
    sweep || sk=?
  fi
fi
csv() { o=; for x in $1; do o=${o:+$o,}$x; done; }
ifs=$IFS
key() {
  IFS=-; set -f; set -- $1; IFS=$ifs; set +f
  q=$1$2$3$4$5
  case $q in ""|*[!0-9a-f]*) exit 3 ;; esac
}
for v in $U; do key "$v"; eval "_f$q= _k$q= _a$q="; done
for e in $f; do
  p=${e%%:*}; key "${e#*:}"
  eval "_f$q=\${_f$q:+\$_f$q,}\$p; _p$p=\$q"
done
for e in $k; do
  p=${e%%:*}; key "${e#*:}"
  eval "_k$q=\${_k$q:+\$_k$q,}\$p"
done
ra=
for p in $a; do
  eval "q=\${_p$p-}"
  if [ -n "$q" ]; then
    eval "_a$q=\${_a$q:+\$_a$q,}\$p"
  else
    case " $r " in *" $p "*) ra="$ra $p" ;; esac
  fi
done
csv "$r"; R=$o
csv "$ra"; ra=$o
for v in $U; do
  key "$v"
  eval "F=\$_f$q K=\$_k$q A=\$_a$q"
  A=$A${A:+${ra:+,}}$ra
  g=0; [ -n "$A" ] || [ "$sk" != 0 ] || g=1
  printf "rbdfence-kill uuid=%s found=%s killed=%s alive=%s unknown=%s sockets=%s:%s gone=%s\n" "$v" "$F" "$K" "$A" "$R" "$sa" "$sk" "$g"
done
exit 0
