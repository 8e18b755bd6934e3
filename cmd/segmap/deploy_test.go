package main

import (
	"bytes"
	"errors"
	"io"
	"os"
	"path"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"

	"go.yaml.in/yaml/v3"
)

// The Kubernetes files under deploy/kubernetes are checked here against
// the code they deploy, so that a renamed command or flag, a file left
// out of the kustomization or a sidecar image left floating fails a test
// instead of a user's install.

const (
	deployDir     = "../../deploy/kubernetes"
	csiDriverName = "csi.segmap.io"
	segmapImage   = "ghcr.io/segmap/segmap"
)

// manifest is one YAML document of a file under deployDir.
type manifest struct {
	file string
	doc  map[string]any
}

// where names a document in messages: file, kind and name.
func (m manifest) where() string {
	return m.file + ": " + str(m.doc, "kind") + " " + str(m.doc, "metadata", "name")
}

// dig walks maps by key and returns what it finds there, nil if any step
// is missing or not a map.
func dig(v any, keys ...string) any {
	for _, k := range keys {
		m, ok := v.(map[string]any)
		if !ok {
			return nil
		}
		v = m[k]
	}
	return v
}

// str is dig for a string: "" if missing or not a string.
func str(v any, keys ...string) string {
	s, _ := dig(v, keys...).(string)
	return s
}

// list is dig for a sequence of maps; elements that are not maps are
// returned as nil maps, which every accessor treats as empty.
func list(v any, keys ...string) []map[string]any {
	var out []map[string]any
	items, _ := dig(v, keys...).([]any)
	for _, it := range items {
		m, _ := it.(map[string]any)
		out = append(out, m)
	}
	return out
}

// stringList is dig for a sequence of strings; a non-string element fails t.
func stringList(t *testing.T, where string, v any, keys ...string) []string {
	t.Helper()
	var out []string
	items, _ := dig(v, keys...).([]any)
	for _, it := range items {
		s, ok := it.(string)
		if !ok {
			t.Errorf("%s: %s: %v is not a string", where, strings.Join(keys, "."), it)
			continue
		}
		out = append(out, s)
	}
	return out
}

// loadDeploy reads every YAML document under deployDir: the manifests,
// the names of their files, and the kustomization.
func loadDeploy(t *testing.T) (docs []manifest, files []string, kustomization map[string]any) {
	t.Helper()
	entries, err := os.ReadDir(deployDir)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		name := e.Name()
		if e.IsDir() || (!strings.HasSuffix(name, ".yaml") && !strings.HasSuffix(name, ".yml")) {
			continue
		}
		data, err := os.ReadFile(filepath.Join(deployDir, name))
		if err != nil {
			t.Fatal(err)
		}
		dec := yaml.NewDecoder(bytes.NewReader(data))
		var fileDocs []map[string]any
		for {
			var doc map[string]any
			err := dec.Decode(&doc)
			if errors.Is(err, io.EOF) {
				break
			}
			if err != nil {
				t.Fatalf("%s: %v", name, err)
			}
			if doc != nil { // an empty document between two ---
				fileDocs = append(fileDocs, doc)
			}
		}
		if name == "kustomization.yaml" {
			if len(fileDocs) != 1 {
				t.Fatalf("%s: %d documents, want 1", name, len(fileDocs))
			}
			kustomization = fileDocs[0]
			continue
		}
		if len(fileDocs) == 0 {
			t.Errorf("%s: no document", name)
		}
		files = append(files, name)
		for _, d := range fileDocs {
			docs = append(docs, manifest{file: name, doc: d})
		}
	}
	if kustomization == nil {
		t.Fatalf("%s: no kustomization.yaml", deployDir)
	}
	return docs, files, kustomization
}

// podContainer is one container of a pod template.
type podContainer struct {
	pod  manifest
	spec map[string]any // the pod's spec
	c    map[string]any
}

func (c podContainer) where() string { return c.pod.where() + " container " + str(c.c, "name") }

// argv is the container's command line as the image runs it: command
// (the image's entrypoint when absent) and args.
func (c podContainer) argv(t *testing.T) (command, args []string) {
	return stringList(t, c.where(), c.c, "command"), stringList(t, c.where(), c.c, "args")
}

// containers returns the containers (init containers too) of every pod
// template in docs.
func containers(docs []manifest) []podContainer {
	var out []podContainer
	for _, m := range docs {
		switch str(m.doc, "kind") {
		case "Deployment", "DaemonSet", "StatefulSet", "ReplicaSet", "Job":
		default:
			continue
		}
		spec, _ := dig(m.doc, "spec", "template", "spec").(map[string]any)
		for _, key := range []string{"initContainers", "containers"} {
			for _, c := range list(spec, key) {
				out = append(out, podContainer{pod: m, spec: spec, c: c})
			}
		}
	}
	return out
}

// runsSegmap: the container runs the segmap image.
func (c podContainer) runsSegmap() bool {
	return strings.HasPrefix(str(c.c, "image"), segmapImage+":")
}

// flagValue returns the value of --name=VALUE or --name VALUE in args.
func flagValue(args []string, name string) (string, bool) {
	for i, a := range args {
		if v, ok := strings.CutPrefix(a, "--"+name+"="); ok {
			return v, true
		}
		if a == "--"+name && i+1 < len(args) {
			return args[i+1], true
		}
	}
	return "", false
}

// TestDeployManifests: every file under deploy/kubernetes parses, each
// document is a Kubernetes object with a name, the kustomization lists
// every file, the driver's name is the same everywhere, sidecar images
// are pinned, and each pod's references (volumes, environment
// variables, ConfigMap keys, the CSI socket) lead somewhere.
func TestDeployManifests(t *testing.T) {
	docs, files, kustomization := loadDeploy(t)

	t.Run("objects", func(t *testing.T) {
		seen := map[string]string{}
		for _, m := range docs {
			for _, key := range [][]string{{"apiVersion"}, {"kind"}, {"metadata", "name"}} {
				if str(m.doc, key...) == "" {
					t.Errorf("%s: no %s", m.where(), strings.Join(key, "."))
				}
			}
			id := str(m.doc, "apiVersion") + " " + str(m.doc, "kind") + " " + str(m.doc, "metadata", "namespace") + "/" + str(m.doc, "metadata", "name")
			if prev, ok := seen[id]; ok {
				t.Errorf("%s: %s also in %s", m.file, id, prev)
			}
			seen[id] = m.file
		}
	})

	t.Run("kustomization", func(t *testing.T) {
		if k := str(kustomization, "kind"); k != "Kustomization" {
			t.Errorf("kustomization.yaml: kind %q", k)
		}
		listed := stringList(t, "kustomization.yaml", kustomization, "resources")
		for _, r := range listed {
			if !slices.Contains(files, r) {
				t.Errorf("kustomization.yaml lists %s, which is not a manifest in %s", r, deployDir)
			}
		}
		for _, f := range files {
			if !slices.Contains(listed, f) {
				t.Errorf("kustomization.yaml does not list %s", f)
			}
		}
		if len(listed) != len(slices.Compact(slices.Sorted(slices.Values(listed)))) {
			t.Errorf("kustomization.yaml lists a file twice: %q", listed)
		}
	})

	t.Run("driver name", func(t *testing.T) {
		// Each kind that names the driver, and where; every kind must be there.
		names := map[string][]string{
			"CSIDriver":                {"metadata", "name"},
			"StorageClass":             {"provisioner"},
			"VolumeSnapshotClass":      {"driver"},
			"VolumeGroupSnapshotClass": {"driver"},
		}
		found := map[string]int{}
		for _, m := range docs {
			key, ok := names[str(m.doc, "kind")]
			if !ok {
				continue
			}
			found[str(m.doc, "kind")]++
			if got := str(m.doc, key...); got != csiDriverName {
				t.Errorf("%s: %s is %q, want %q", m.where(), strings.Join(key, "."), got, csiDriverName)
			}
		}
		for kind := range names {
			if found[kind] == 0 {
				t.Errorf("no %s in %s", kind, deployDir)
			}
		}
		registrars := 0
		for _, c := range containers(docs) {
			_, args := c.argv(t)
			if p, ok := flagValue(args, "kubelet-registration-path"); ok {
				registrars++
				if !strings.Contains(p, "/plugins/"+csiDriverName+"/") {
					t.Errorf("%s: --kubelet-registration-path %s is not under plugins/%s/", c.where(), p, csiDriverName)
				}
			}
		}
		if registrars == 0 {
			t.Errorf("no node-driver-registrar (--kubelet-registration-path) in %s", deployDir)
		}
	})

	t.Run("images pinned", func(t *testing.T) {
		// A sidecar runs an exact release (vX.Y.Z) or a digest.
		pinned := regexp.MustCompile(`^[^@]+:v\d+\.\d+\.\d+$|@sha256:[0-9a-f]{64}$`)
		for _, c := range containers(docs) {
			image := str(c.c, "image")
			switch {
			case image == "":
				t.Errorf("%s: no image", c.where())
			case c.runsSegmap():
				// Built from this tree (deploy/Dockerfile); its tag is the
				// user's (kustomize edit set image).
			case !pinned.MatchString(image):
				t.Errorf("%s: image %s is not pinned to a release (:vX.Y.Z) or a digest", c.where(), image)
			}
		}
	})

	t.Run("references", func(t *testing.T) {
		configKeys := map[string]bool{} // namespace/name/key of every ConfigMap key
		for _, m := range docs {
			if str(m.doc, "kind") != "ConfigMap" {
				continue
			}
			data, _ := dig(m.doc, "data").(map[string]any)
			for k := range data {
				configKeys[str(m.doc, "metadata", "namespace")+"/"+str(m.doc, "metadata", "name")+"/"+k] = true
			}
		}
		varRef := regexp.MustCompile(`\$\(([A-Za-z_][A-Za-z0-9_]*)\)`)
		for _, c := range containers(docs) {
			var volumes []string
			for _, v := range list(c.spec, "volumes") {
				volumes = append(volumes, str(v, "name"))
			}
			for _, vm := range list(c.c, "volumeMounts") {
				if !slices.Contains(volumes, str(vm, "name")) {
					t.Errorf("%s: mounts volume %q, which the pod does not have", c.where(), str(vm, "name"))
				}
			}
			var env []string
			for _, e := range list(c.c, "env") {
				env = append(env, str(e, "name"))
				ref, _ := dig(e, "valueFrom", "configMapKeyRef").(map[string]any)
				if ref == nil {
					continue
				}
				key := str(c.pod.doc, "metadata", "namespace") + "/" + str(ref, "name") + "/" + str(ref, "key")
				if !configKeys[key] {
					t.Errorf("%s: env %s reads ConfigMap key %s, which no ConfigMap here has", c.where(), str(e, "name"), key)
				}
			}
			command, args := c.argv(t)
			for _, a := range append(command, args...) {
				for _, sub := range varRef.FindAllStringSubmatch(a, -1) {
					if !slices.Contains(env, sub[1]) {
						t.Errorf("%s: %q uses $(%s), which the container's env does not define", c.where(), a, sub[1])
					}
				}
			}
		}
	})

	t.Run("csi socket", func(t *testing.T) {
		// In each pod of the driver, the sidecars reach the driver's
		// --endpoint through --csi-address.
		drivers := 0
		for _, c := range containers(docs) {
			_, args := c.argv(t)
			if !c.runsSegmap() || len(args) == 0 || args[0] != "csi" {
				continue
			}
			drivers++
			ep, ok := flagValue(args, "endpoint")
			sock, isUnix := strings.CutPrefix(ep, "unix://")
			if !ok || !isUnix {
				t.Errorf("%s: --endpoint %q, want unix:///PATH", c.where(), ep)
				continue
			}
			sidecars := 0
			for _, s := range containers([]manifest{c.pod}) {
				_, sargs := s.argv(t)
				if addr, ok := flagValue(sargs, "csi-address"); ok {
					sidecars++
					if addr != sock {
						t.Errorf("%s: --csi-address %s, but the driver listens on %s", s.where(), addr, sock)
					}
				}
			}
			if sidecars == 0 {
				t.Errorf("%s: no sidecar in its pod", c.where())
			}
		}
		if drivers == 0 {
			t.Errorf("no container runs 'segmap csi' in %s", deployDir)
		}
	})
}

// TestDeployCommands: every container of the segmap image runs a real
// segmap command, with flags that command has (values of the right type,
// the required ones given) and the positional arguments it accepts, as
// newRoot() parses them.
func TestDeployCommands(t *testing.T) {
	docs, _, _ := loadDeploy(t)
	n := 0
	for _, c := range containers(docs) {
		if !c.runsSegmap() {
			continue
		}
		n++
		t.Run(c.pod.file+"/"+str(c.c, "name"), func(t *testing.T) {
			command, args := c.argv(t)
			if len(command) > 0 {
				// An explicit command must be the binary itself.
				if path.Base(command[0]) != "segmap" {
					t.Fatalf("%s: command %q is not segmap", c.where(), command)
				}
				args = append(slices.Clone(command[1:]), args...)
			}
			root := newRoot()
			cmd, rest, err := root.Find(args)
			if err != nil {
				t.Fatalf("%s: %q: %v", c.where(), args, err)
			}
			if cmd == root || !cmd.Runnable() {
				t.Fatalf("%s: %q runs no segmap command (found %q)", c.where(), args, cmd.CommandPath())
			}
			if err := cmd.ParseFlags(rest); err != nil {
				t.Fatalf("%s: %s: %v", c.where(), cmd.CommandPath(), err)
			}
			if err := cmd.ValidateArgs(cmd.Flags().Args()); err != nil {
				t.Errorf("%s: %s: %v", c.where(), cmd.CommandPath(), err)
			}
			if err := cmd.ValidateRequiredFlags(); err != nil {
				t.Errorf("%s: %s: %v", c.where(), cmd.CommandPath(), err)
			}
			if err := cmd.ValidateFlagGroups(); err != nil {
				t.Errorf("%s: %s: %v", c.where(), cmd.CommandPath(), err)
			}
		})
	}
	if n == 0 {
		t.Errorf("no container runs %s in %s", segmapImage, deployDir)
	}
}
