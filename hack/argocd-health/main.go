// Command argocd-health evaluates Argo CD resource health checks (Lua) the way Argo CD's
// application controller does, so the project's checks are tested by the interpreter and the
// sandbox they will meet, not by a system Lua.
//
// Argo CD's own package (github.com/argoproj/argo-cd/v3/util/lua) cannot be built from the Go
// module proxy here: it imports github.com/argoproj/argo-cd/gitops-engine, which Argo CD's
// go.mod replaces with a directory of its repository and the proxy does not serve. So this
// runner rebuilds the part that decides a health check's result, against the same
// interpreter versions Argo CD v3.5.7 pins (github.com/yuin/gopher-lua v1.1.2 and
// layeh.com/gopher-json for the result) and with the same sandbox for checks configured in
// argocd-cm (resource.customizations.useOpenLibs unset):
//   - no standard libraries but package, base, table and a reduced os (time and date only):
//     no string, math, io or coroutine library, so string.find or s:match fail as in Argo CD;
//   - the object as the global `obj`, JSON numbers as Lua numbers, arrays as sequences;
//   - one second for the whole script (the state's context is cancelled after it);
//   - the result must be a table with a status of Healthy, Progressing, Degraded, Suspended,
//     Missing or Unknown; another status becomes Unknown "Lua returned an invalid health
//     status"; nil is an empty status; anything else is an error.
//
// Usage:
//
//	argocd-health -configmap argocd-cm.yaml -scripts DIR -cases cases.json
//	argocd-health -script check.lua -object object.json
//	argocd-health -version
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"runtime/debug"
	"sort"
	"strings"
	"time"

	lua "github.com/yuin/gopher-lua"
	"gopkg.in/yaml.v3"
	luajson "layeh.com/gopher-json"
)

// Health is what Argo CD reads from a health check's result.
type Health struct {
	Status  string `json:"status"`
	Message string `json:"message"`
}

var validStatus = map[string]bool{
	"Unknown": true, "Progressing": true, "Suspended": true,
	"Healthy": true, "Degraded": true, "Missing": true,
}

// Evaluate runs one health check script on obj in Argo CD's sandbox.
func Evaluate(script string, obj map[string]any) (Health, error) {
	l := lua.NewState(lua.Options{SkipOpenLibs: true})
	defer l.Close()
	for _, lib := range []struct {
		name string
		open lua.LGFunction
	}{
		{lua.LoadLibName, lua.OpenPackage},
		{lua.BaseLibName, lua.OpenBase},
		{lua.TabLibName, lua.OpenTable},
		{lua.OsLibName, openSafeOS},
	} {
		if err := l.CallByParam(lua.P{Fn: l.NewFunction(lib.open), NRet: 0, Protect: true}, lua.LString(lib.name)); err != nil {
			return Health{}, fmt.Errorf("opening %s: %w", lib.name, err)
		}
	}
	l.PreloadModule(lua.OsLibName, func(l *lua.LState) int {
		l.Push(safeOS(l))
		return 1
	})
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	l.SetContext(ctx)
	l.SetGlobal("obj", toLua(l, obj))
	if err := l.DoString(script); err != nil {
		var apiErr *lua.ApiError
		if errors.As(err, &apiErr) && apiErr.Type == lua.ApiErrorRun {
			apiErr.StackTrace = ""
		}
		return Health{}, err
	}
	ret := l.Get(-1)
	switch ret.Type() {
	case lua.LTNil:
		return Health{}, nil
	case lua.LTTable:
		raw, err := luajson.Encode(ret)
		if err != nil {
			return Health{}, err
		}
		var h Health
		if err := json.Unmarshal(raw, &h); err != nil {
			return Health{}, fmt.Errorf("the result %s is not a health status: %w", raw, err)
		}
		if !validStatus[h.Status] {
			return Health{Status: "Unknown", Message: "Lua returned an invalid health status"}, nil
		}
		return h, nil
	default:
		return Health{}, fmt.Errorf("expect table output from Lua script, not %s", ret.Type())
	}
}

// toLua converts a decoded JSON value the way Argo CD hands an object to its scripts.
func toLua(l *lua.LState, v any) lua.LValue {
	switch v := v.(type) {
	case bool:
		return lua.LBool(v)
	case float64:
		return lua.LNumber(v)
	case string:
		return lua.LString(v)
	case []any:
		t := l.CreateTable(len(v), 0)
		for _, item := range v {
			t.Append(toLua(l, item))
		}
		return t
	case map[string]any:
		t := l.CreateTable(0, len(v))
		for k, item := range v {
			t.RawSetH(lua.LString(k), toLua(l, item))
		}
		return t
	default:
		return lua.LNil
	}
}

// The os library Argo CD gives scripts: time and date, nothing that touches the machine.
func openSafeOS(l *lua.LState) int {
	l.SetGlobal(lua.OsLibName, safeOS(l))
	return 0
}

func safeOS(l *lua.LState) *lua.LTable {
	return l.SetFuncs(l.NewTable(), map[string]lua.LGFunction{"time": osTime, "date": osDate})
}

func osTime(l *lua.LState) int {
	if l.GetTop() == 0 || l.Get(1) == lua.LNil {
		l.Push(lua.LNumber(time.Now().Unix()))
		return 1
	}
	t := l.CheckTable(1)
	field := func(name string, def int) int {
		if n, ok := t.RawGetString(name).(lua.LNumber); ok {
			return int(n)
		}
		return def
	}
	when := time.Date(field("year", 1970), time.Month(field("month", 1)), field("day", 1),
		field("hour", 12), field("min", 0), field("sec", 0), 0, time.Local)
	l.Push(lua.LNumber(when.Unix()))
	return 1
}

func osDate(l *lua.LState) int {
	format := l.OptString(1, "%c")
	when := time.Now()
	if l.GetTop() >= 2 {
		when = time.Unix(int64(l.CheckNumber(2)), 0)
	}
	if strings.HasPrefix(format, "!") {
		format = format[1:]
		when = when.UTC()
	}
	if format == "*t" {
		t := l.NewTable()
		for k, v := range map[string]int{
			"year": when.Year(), "month": int(when.Month()), "day": when.Day(),
			"hour": when.Hour(), "min": when.Minute(), "sec": when.Second(),
			"wday": int(when.Weekday()) + 1, "yday": when.YearDay(),
		} {
			t.RawSetString(k, lua.LNumber(v))
		}
		t.RawSetString("isdst", lua.LFalse)
		l.Push(t)
		return 1
	}
	layouts := map[byte]string{'Y': "2006", 'm': "01", 'd': "02", 'H': "15", 'M': "04", 'S': "05",
		'y': "06", 'b': "Jan", 'B': "January", 'a': "Mon", 'A': "Monday", 'Z': "MST",
		'c': "Mon Jan  2 15:04:05 2006", 'x': "01/02/06", 'X': "15:04:05"}
	var out strings.Builder
	for i := 0; i < len(format); i++ {
		if format[i] == '%' && i+1 < len(format) {
			i++
			if layout, ok := layouts[format[i]]; ok {
				out.WriteString(when.Format(layout))
			} else {
				out.WriteByte(format[i])
			}
			continue
		}
		out.WriteByte(format[i])
	}
	l.Push(lua.LString(out.String()))
	return 1
}

// Case is one expected result: Argo CD's health of object.
type Case struct {
	Name    string         `json:"name"`
	Object  map[string]any `json:"object"`
	Status  string         `json:"status"`
	Message *string        `json:"message,omitempty"`
}

// configMapKey is where Argo CD looks for the check of an object's kind in argocd-cm.
func configMapKey(obj map[string]any) (string, error) {
	apiVersion, _ := obj["apiVersion"].(string)
	kind, _ := obj["kind"].(string)
	if apiVersion == "" || kind == "" {
		return "", errors.New("the object needs apiVersion and kind")
	}
	group := ""
	if i := strings.Index(apiVersion, "/"); i >= 0 {
		group = apiVersion[:i]
	}
	if group == "" {
		return "resource.customizations.health." + kind, nil
	}
	return "resource.customizations.health." + group + "_" + kind, nil
}

func readConfigMap(path string) (map[string]string, error) {
	raw, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var cm struct {
		APIVersion string                `yaml:"apiVersion"`
		Kind       string                `yaml:"kind"`
		Metadata   struct{ Name string } `yaml:"metadata"`
		Data       map[string]string     `yaml:"data"`
	}
	if err := yaml.Unmarshal(raw, &cm); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	if cm.Kind != "ConfigMap" || cm.Metadata.Name != "argocd-cm" {
		return nil, fmt.Errorf("%s: not the argocd-cm ConfigMap (kind %q, name %q)", path, cm.Kind, cm.Metadata.Name)
	}
	return cm.Data, nil
}

// runCases checks every case with the ConfigMap's script for its kind and with the script
// file of the same kind, and that every script file was exercised.
func runCases(configMap, scriptDir, casesPath string) (int, error) {
	data, err := readConfigMap(configMap)
	if err != nil {
		return 0, err
	}
	raw, err := os.ReadFile(casesPath)
	if err != nil {
		return 0, err
	}
	var cases []Case
	if err := json.Unmarshal(raw, &cases); err != nil {
		return 0, fmt.Errorf("%s: %w", casesPath, err)
	}
	files, err := filepath.Glob(filepath.Join(scriptDir, "*.lua"))
	if err != nil || len(files) == 0 {
		return 0, fmt.Errorf("no health checks in %s", scriptDir)
	}
	used := map[string]int{}
	failures := 0
	for _, c := range cases {
		key, err := configMapKey(c.Object)
		if err != nil {
			return 0, fmt.Errorf("case %q: %w", c.Name, err)
		}
		kind := c.Object["kind"].(string)
		file := filepath.Join(scriptDir, strings.ToLower(kind)+".lua")
		fromFile, err := os.ReadFile(file)
		if err != nil {
			return 0, fmt.Errorf("case %q: %w", c.Name, err)
		}
		used[file]++
		fromCM, ok := data[key]
		if !ok {
			fmt.Printf("FAIL %s: %s: argocd-cm has no %s\n", kind, c.Name, key)
			failures++
			continue
		}
		for _, src := range []struct{ where, script string }{{"argocd-cm", fromCM}, {filepath.Base(file), string(fromFile)}} {
			got, err := Evaluate(src.script, c.Object)
			switch {
			case err != nil:
				fmt.Printf("FAIL %s (%s): %s: error %v\n", kind, src.where, c.Name, err)
				failures++
			case got.Status != c.Status || (c.Message != nil && got.Message != *c.Message) || got.Message == "":
				want := c.Status
				if c.Message != nil {
					want += " (" + *c.Message + ")"
				}
				fmt.Printf("FAIL %s (%s): %s: got %s (%s), want %s\n", kind, src.where, c.Name, got.Status, got.Message, want)
				failures++
			default:
				fmt.Printf("ok   %s (%s): %s -> %s (%s)\n", kind, src.where, c.Name, got.Status, got.Message)
			}
		}
	}
	sort.Strings(files)
	for _, f := range files {
		if used[f] == 0 {
			fmt.Printf("FAIL %s: no case exercises it\n", f)
			failures++
		}
	}
	fmt.Printf("%d cases, %d checks, %d failures\n", len(cases), 2*len(cases), failures)
	return failures, nil
}

func main() {
	configMap := flag.String("configmap", "", "the argocd-cm ConfigMap (YAML) whose health checks to run")
	scripts := flag.String("scripts", "", "the directory of the same checks as <kind>.lua files")
	casesPath := flag.String("cases", "", "the cases (JSON: [{name, object, status, message?}])")
	script := flag.String("script", "", "evaluate this one script ...")
	object := flag.String("object", "", "... on this object (JSON) and print the result")
	version := flag.Bool("version", false, "print the interpreter versions and exit")
	flag.Parse()
	switch {
	case *version:
		fmt.Println(versions())
	case *script != "":
		src, err := os.ReadFile(*script)
		check(err)
		raw, err := os.ReadFile(*object)
		check(err)
		var obj map[string]any
		check(json.Unmarshal(raw, &obj))
		h, err := Evaluate(string(src), obj)
		check(err)
		out, _ := json.Marshal(h)
		fmt.Println(string(out))
	case *configMap != "" && *scripts != "" && *casesPath != "":
		failures, err := runCases(*configMap, *scripts, *casesPath)
		check(err)
		if failures > 0 {
			os.Exit(1)
		}
	default:
		flag.Usage()
		os.Exit(2)
	}
}

func check(err error) {
	if err != nil {
		fmt.Fprintln(os.Stderr, "argocd-health:", err)
		os.Exit(1)
	}
}

func versions() string {
	info, ok := debug.ReadBuildInfo()
	if !ok {
		return "unknown"
	}
	var parts []string
	for _, d := range info.Deps {
		if d.Path == "github.com/yuin/gopher-lua" || d.Path == "layeh.com/gopher-json" {
			parts = append(parts, d.Path+" "+d.Version)
		}
	}
	return strings.Join(parts, ", ")
}
