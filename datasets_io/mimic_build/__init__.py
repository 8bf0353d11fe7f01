"""Build the curriculum from the raw PhysioNet releases: MIMIC-CXR-JPG + MIMIC-CXR reports + MIMIC-IV (+ MIMIC-IV-ED).

    launcher data build --cxr-jpg physionet.org/files/mimic-cxr-jpg/2.0.0 \\
        --reports physionet.org/files/mimic-cxr/2.0.0 --mimic-iv physionet.org/files/mimiciv/2.2 \\
        --mimic-iv-ed physionet.org/files/mimic-iv-ed/2.2 --out data/mimic --subjects p10 --max-studies 2000
    launcher local --config configs/tiny.yaml --set data.root=data/mimic

    # the same on the raw-format fixture this project generates (no credentials needed):
    python -m datasets_io.mimic_fixture --out /tmp/mimic_raw
    launcher data build --cxr-jpg /tmp/mimic_raw/mimic-cxr-jpg --reports /tmp/mimic_raw/mimic-cxr \\
        --mimic-iv /tmp/mimic_raw/mimiciv --mimic-iv-ed /tmp/mimic_raw/mimic-iv-ed --out /tmp/mimic_curriculum

Writes OUT/curriculum_{train,val,test}.jsonl (official split "validate" -> val), OUT/files/pXX/p<subject>/s<study>/
<dicom_id>.jpg (a symlink to, or a copy of, the chosen image, so `--data-root OUT` works) and OUT/build_report.json.
Every record uses exactly the templates of datasets_io.records. The steps, each counted in the report:

1. metadata + split: one image per study, by view preference (PA over AP unless --views says otherwise; ties by
   dicom_id), the study's split from the official split file. A patient in two splits fails the build.
2. CheXpert labels, all 14: 1.0 Positive, 0.0 Negative, -1.0 Uncertain, blank = not mentioned. Not mentioned is
   never merged into Uncertain: by default it is omitted from the block (--unmentioned omit), or rendered Negative
   (--unmentioned negative, the common reading of a blank); records.CHEXPERT_VALUES is unchanged either way.
3. The impression, by the MIMIC-CXR sectioning convention (MIT-LCP/mimic-cxr txt/section_parser.py): the last
   IMPRESSION section, else the last FINDINGS section, else the report's last paragraph. No usable text: dropped.
4. MIMIC-IV: the admission whose window admittime..dischtime contains the study's date and time (never "the most
   recent admission"); ICD flags of that admission from configs/icd_map.yaml; a study inside no admission has no
   known diagnoses, so by default it gets no Stage B row (--no-admission stage-a-only; `icd-none` writes
   {"findings": "None"} instead). Age at the study = anchor_age + study year - anchor_year; sex; admission type;
   chronic conditions from admissions discharged before the study; the lab panel (LAB_PANEL) and ED vitals nearest
   BEFORE the study within a window, with unit, reference range and hours before (by charttime, the time the
   specimen or vital was taken). Nothing measured after the study is used.

labevents.csv.gz is tens of GB: it is streamed in blocks, filtered to the panel's items and the chosen subjects,
and reduced on the fly to the best row per (study, lab) (NearestBefore), so memory depends on the number of
studies, never on the file's size (benchmarks/labevents_memory.py). Output is deterministic for the same inputs.

The modules, by job (the CLI's arguments are in launcher/commands/data.py):

    options.py          BuildOptions: what `launcher data build` was asked to do
    raw_files.py        the release files, the columns read from each, and the streaming CSV reader
    studies.py          steps 1-3: image by view, split, CheXpert, report text -> Study
    report_sections.py  step 3's parser: a free-text report -> sections -> the impression
    icd_map.py          the versioned ICD flag / chronic-condition map (configs/icd_map.yaml)
    time_alignment.py   study times, and NearestBefore: the measurement nearest before each study
    ehr.py              step 4: admission, ICD flags, age/sex, labs and vitals -> the Patient Data block
    build.py            every step in order, the records and images written, build_report.json and its summary
"""
