package lint

import (
	"fmt"
	"go/ast"
	"go/parser"
	"go/token"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"testing"
)

// root is the module root, relative to this package's directory (where
// go test runs).
const root = "../.."

// srcFile is one parsed Go file.
type srcFile struct {
	path string // relative to the module root, slash-separated
	fset *token.FileSet
	file *ast.File
	test bool // a _test.go file
}

// pos is f's "path:line" for n.
func (f *srcFile) pos(n ast.Node) string {
	return fmt.Sprintf("%s:%d", f.path, f.fset.Position(n.Pos()).Line)
}

// importName is the name under which f imports path ("" if it does not).
func (f *srcFile) importName(path string) string {
	for _, im := range f.file.Imports {
		if p, _ := strconv.Unquote(im.Path.Value); p != path {
			continue
		}
		if im.Name != nil {
			return im.Name.Name
		}
		return path[strings.LastIndex(path, "/")+1:]
	}
	return ""
}

// isSel reports whether e is pkg.name, with pkg the local name of an import
// (pkg "" never matches).
func isSel(e ast.Expr, pkg string, names ...string) (string, bool) {
	se, ok := e.(*ast.SelectorExpr)
	if !ok || pkg == "" {
		return "", false
	}
	id, ok := se.X.(*ast.Ident)
	if !ok || id.Name != pkg || id.Obj != nil { // Obj != nil: a local variable
		return "", false
	}
	for _, n := range names {
		if se.Sel.Name == n {
			return n, true
		}
	}
	return "", false
}

// parseTree parses every .go file under root/dirs (skipping testdata and
// hidden directories).
func parseTree(t *testing.T, dirs ...string) []*srcFile {
	t.Helper()
	var out []*srcFile
	for _, d := range dirs {
		err := filepath.WalkDir(filepath.Join(root, d), func(p string, e fs.DirEntry, err error) error {
			if err != nil {
				return err
			}
			name := e.Name()
			if e.IsDir() {
				if name == "testdata" || (strings.HasPrefix(name, ".") && name != ".") || strings.HasPrefix(name, "_") {
					return filepath.SkipDir
				}
				return nil
			}
			if !strings.HasSuffix(name, ".go") {
				return nil
			}
			rel, err := filepath.Rel(root, p)
			if err != nil {
				return err
			}
			fset := token.NewFileSet()
			f, err := parser.ParseFile(fset, p, nil, 0)
			if err != nil {
				return err
			}
			out = append(out, &srcFile{path: filepath.ToSlash(rel), fset: fset, file: f, test: strings.HasSuffix(name, "_test.go")})
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
	}
	if len(out) == 0 {
		t.Fatalf("no Go files under %v", dirs)
	}
	return out
}

// allowList checks found (key -> position) against allowed (key ->
// reason): it fails for each key found and not allowed, and for each
// allowed key not found (the exception has gone: drop it from the list).
func allowList(t *testing.T, rule string, found map[string]string, allowed map[string]string) {
	t.Helper()
	var keys []string
	for k := range found {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		if _, ok := allowed[k]; !ok {
			t.Errorf("%s: %s (%s)", found[k], rule, k)
		}
	}
	keys = keys[:0]
	for k := range allowed {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		if _, ok := found[k]; !ok {
			t.Errorf("allow-list entry %q matches nothing any more: remove it", k)
		}
	}
}

// funcName names the function declaration d for allow-list keys: "F" or
// "(T).M" / "(*T).M".
func funcName(d *ast.FuncDecl) string {
	if d.Recv == nil || len(d.Recv.List) == 0 {
		return d.Name.Name
	}
	var b strings.Builder
	var typ func(ast.Expr)
	typ = func(e ast.Expr) {
		switch e := e.(type) {
		case *ast.StarExpr:
			b.WriteString("*")
			typ(e.X)
		case *ast.Ident:
			b.WriteString(e.Name)
		case *ast.IndexExpr:
			typ(e.X)
		case *ast.IndexListExpr:
			typ(e.X)
		}
	}
	b.WriteString("(")
	typ(d.Recv.List[0].Type)
	b.WriteString(").")
	b.WriteString(d.Name.Name)
	return b.String()
}

// TestNoWallClock: the pure core (internal/table) and the controller read
// no wall clock and start no timers in their non-test files. The table is
// plain data and functions (STYLE "pure core"); the controller gets its
// clock from Config.Now, so that a test can drive time.
func TestNoWallClock(t *testing.T) {
	dirs := []string{"internal/table", "internal/controller"}
	clock := []string{"Now", "Since", "Until", "Sleep", "After", "AfterFunc", "NewTimer", "NewTicker", "Tick"}
	// Key: "file func time.X".
	allowed := map[string]string{
		"internal/controller/controller.go New time.Now": "Config.Now's documented default: the one place the real clock enters",
		"internal/controller/controller.go (*Controller).waitHold time.NewTimer": "waits out a Hold (whose end is judged by c.now, " +
			"and which an attach can end early through a channel); a pause, not a reading of the clock: " +
			"injecting a timer would add a Config field nothing sets",
	}
	found := map[string]string{}
	for _, f := range parseTree(t, dirs...) {
		if f.test {
			continue
		}
		tm := f.importName("time")
		for _, d := range f.file.Decls {
			where := "(package level)"
			if fd, ok := d.(*ast.FuncDecl); ok {
				where = funcName(fd)
			}
			ast.Inspect(d, func(n ast.Node) bool {
				if e, ok := n.(ast.Expr); ok {
					if name, ok := isSel(e, tm, clock...); ok {
						found[fmt.Sprintf("%s %s time.%s", f.path, where, name)] = f.pos(n)
					}
				}
				return true
			})
		}
	}
	allowList(t, "wall clock in the pure core or the controller (inject it)", found, allowed)
}

// TestSentinelsInErrorsGo: a package's sentinel errors (package-level vars
// named Err*/err* made by errors.New or fmt.Errorf) are declared in its
// errors.go, each with its doc comment (STYLE "Errors", bbolt
// errors/errors.go). Test files may keep their own.
func TestSentinelsInErrorsGo(t *testing.T) {
	// Key: "file name".
	allowed := map[string]string{}
	found := map[string]string{}
	for _, f := range parseTree(t, "internal", "cmd") {
		if f.test || filepath.Base(f.path) == "errors.go" {
			continue
		}
		errs, fmtName := f.importName("errors"), f.importName("fmt")
		for _, d := range f.file.Decls {
			gd, ok := d.(*ast.GenDecl)
			if !ok || gd.Tok != token.VAR {
				continue
			}
			for _, s := range gd.Specs {
				vs := s.(*ast.ValueSpec)
				for i, name := range vs.Names {
					if i >= len(vs.Values) || !isErrName(name.Name) {
						continue
					}
					call, ok := vs.Values[i].(*ast.CallExpr)
					if !ok {
						continue
					}
					_, isNew := isSel(call.Fun, errs, "New")
					_, isErrorf := isSel(call.Fun, fmtName, "Errorf")
					if isNew || isErrorf {
						found[f.path+" "+name.Name] = f.pos(name)
					}
				}
			}
		}
	}
	allowList(t, "sentinel error outside errors.go", found, allowed)
}

// isErrName reports whether name is a sentinel's name: Err or err followed
// by an upper-case letter or digit.
func isErrName(name string) bool {
	for _, p := range []string{"Err", "err"} {
		if rest, ok := strings.CutPrefix(name, p); ok && rest != "" && (rest[0] >= 'A' && rest[0] <= 'Z' || rest[0] >= '0' && rest[0] <= '9') {
			return true
		}
	}
	return false
}

// TestMutexInMuStruct: a sync.Mutex or sync.RWMutex is a struct field only
// embedded in a field named mu of struct type, together with what it
// guards (STYLE "Concurrency", pebble db.go):
//
//	mu struct {
//		sync.Mutex
//		closed bool
//	}
//
// Test files are not checked.
func TestMutexInMuStruct(t *testing.T) {
	const hat = "a lone mutex with the fields it guards after it; grouping them under mu renames " +
		"every access in files that other issue 12 branches edit: convert once they have landed"
	// Key: "file Type.field" (nested struct fields joined with dots; an
	// embedded mutex is named Mutex or RWMutex).
	allowed := map[string]string{
		"internal/controller/controller.go Controller.agents.Mutex": "a leaf lock beside the others (documented on the field); " +
			"it cannot also be called mu",
		"internal/controller/controller.go Controller.state": "serialises Close against the state changes under way; guards no field",
		"internal/controller/locks.go keyedLock.RWMutex":     "the lock keyedLocks hands out; guards no field of its own",
		// Locks that serialise an operation and guard no field: there is
		// nothing to group with them.
		"internal/agent/agent.go Agent.openMu":                "serialises Open and Disk.Close; guards no field",
		"internal/standalone/standalone.go Cluster.provision": "serialises Provision; guards no field",
		"internal/nbd/nbdclient/client.go Client.rmw":         "orders read-modify-write cycles against other writes; guards no field",
		// A lone mutex followed by the fields it guards (the older Go
		// layout).
		"internal/agent/agent.go Agent.contsMu":         hat,
		"internal/ha/conn.go Conn.mu":                   hat,
		"internal/ha/ha.go keepalive.mu":                hat,
		"internal/ha/mux.go mux.mu":                     hat,
		"internal/nbd/nbdclient/client.go clientReq.mu": hat,
		"internal/nbd/transmission.go transmission.wmu": hat,
		"internal/rpc/transport/client.go session.mu":   hat,
		"internal/rpc/transport/server.go Server.mu":    hat,
	}
	found := map[string]string{}
	for _, f := range parseTree(t, "internal", "cmd") {
		if f.test {
			continue
		}
		syncName := f.importName("sync")
		if syncName == "" {
			continue
		}
		seen := map[*ast.StructType]bool{}
		var walk func(st *ast.StructType, name string, inMu bool)
		walk = func(st *ast.StructType, name string, inMu bool) {
			seen[st] = true
			for _, fl := range st.Fields.List {
				typ := fl.Type
				if se, ok := typ.(*ast.StarExpr); ok {
					typ = se.X
				}
				if m, ok := isSel(typ, syncName, "Mutex", "RWMutex"); ok {
					if len(fl.Names) == 0 {
						if !inMu {
							found[f.path+" "+name+"."+m] = f.pos(fl)
						}
					} else {
						for _, n := range fl.Names {
							found[f.path+" "+name+"."+n.Name] = f.pos(fl)
						}
					}
					continue
				}
				if sub, ok := fl.Type.(*ast.StructType); ok {
					for _, n := range fl.Names {
						walk(sub, name+"."+n.Name, n.Name == "mu")
					}
				}
			}
		}
		ast.Inspect(f.file, func(n ast.Node) bool {
			if ts, ok := n.(*ast.TypeSpec); ok {
				if st, ok := ts.Type.(*ast.StructType); ok {
					walk(st, ts.Name.Name, false)
				}
			}
			return true
		})
		ast.Inspect(f.file, func(n ast.Node) bool { // struct types with no type name
			if st, ok := n.(*ast.StructType); ok && !seen[st] {
				walk(st, fmt.Sprintf("struct@%d", f.fset.Position(st.Pos()).Line), false)
			}
			return true
		})
	}
	allowList(t, "mutex outside a mu struct { sync.Mutex; ... } field", found, allowed)
}

func TestMain(m *testing.M) {
	if _, err := os.Stat(filepath.Join(root, "go.mod")); err != nil {
		fmt.Fprintln(os.Stderr, "lint: run from internal/lint (go test ./internal/lint):", err)
		os.Exit(2)
	}
	os.Exit(m.Run())
}
