/*
 * Imports a folder of `cellseg predict --out-dir` results into the images of a QuPath project
 * (QuPath 0.4 - 0.7). Open the project, set RESULTS_DIR below, then Automate > Script editor >
 * Run (this script loops over the project's images itself; do not use "Run for project").
 *
 * Each image is matched by its name without the last extension: image "CMU-1.svs" takes
 * RESULTS_DIR/CMU-1.geojson (or .geojson.gz, or .json), the name cellseg gives the results of
 * slide CMU-1.svs. The objects are nuclei as detections, or cells with their nucleus
 * (--object-type cell), with their measurements ("Nucleus: Area µm^2", "Nucleus: Hematoxylin
 * OD mean", ...). Coordinates are already in QuPath's frame of the whole slide.
 */

import java.util.zip.GZIPInputStream
import qupath.lib.io.PathIO

def RESULTS_DIR = new File("/path/to/results")   // the --out-dir folder
def REPLACE = true    // remove the image's existing detections (an earlier import) first
def SUFFIXES = [".geojson", ".geojson.gz", ".json"]

def project = getProject()
if (project == null) {
    println "Open a project first"
    return
}
if (!RESULTS_DIR.isDirectory()) {
    println "Not a folder: ${RESULTS_DIR}"
    return
}

int imported = 0
for (entry in project.getImageList()) {
    def name = entry.getImageName()
    def stem = name.contains(".") ? name.substring(0, name.lastIndexOf(".")) : name
    def file = SUFFIXES.collect { new File(RESULTS_DIR, stem + it) }.find { it.isFile() }
    if (file == null) {
        println "${name}: no ${stem}.geojson in ${RESULTS_DIR}, skipped"
        continue
    }
    def objects
    def stream = new BufferedInputStream(new FileInputStream(file))
    if (file.name.endsWith(".gz"))
        stream = new GZIPInputStream(stream)
    stream.withCloseable { objects = PathIO.readObjectsFromGeoJSON(it) }

    def imageData = entry.readImageData()
    def hierarchy = imageData.getHierarchy()
    if (REPLACE)
        hierarchy.removeObjects(hierarchy.getDetectionObjects(), true)
    hierarchy.addObjects(objects)
    entry.saveImageData(imageData)
    println "${name}: ${objects.size()} objects from ${file.name}"
    imported++
}
println "Imported results into ${imported} of ${project.getImageList().size()} images"
